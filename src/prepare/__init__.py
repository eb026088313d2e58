"""Preparing the raw images: copies, splitting, decoding and the image cache."""
