"""The demo page: upload a dermoscopy image, see the served model's calibrated probabilities and where it looked."""
