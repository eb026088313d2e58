"""Shades of Gray colour constancy (Finlayson and Trezzi 2004): each image's illuminant estimated and divided out.

Another dermatoscope, camera or white balance tints the whole image; the ISIC 2018 and 2019 top entries removed that
tint before the network saw it. It runs inside the model (`learn.model.Classifier`), so the training loop, evaluate,
the MLflow model, serving, `src.predict` and the demo page all apply it to the same pixels, and the image cache
keeps the pixels as decoded (switching it on or off needs no new split).
"""

from __future__ import annotations

import torch


def shades_of_gray(images: torch.Tensor, power: float) -> torch.Tensor:
    """Float (N, 3, H, W) pixels in [0, 255] -> the same with each image's illuminant made grey.

    The illuminant is the Minkowski p-mean of each channel (p = 1: grey world; large p: the brightest pixels, max-RGB);
    each channel is scaled so the illuminant becomes the grey of its mean, which keeps the image's brightness. An
    image whose channels already share one p-mean (a grey world) is left unchanged.
    """
    x = images.clamp(0, 255) / 255  # in [0, 1] so that x ** 6 stays well inside float32
    illuminant = x.pow(power).mean(dim=(-2, -1), keepdim=True).pow(1.0 / power)  # (N, 3, 1, 1)
    gain = illuminant.mean(dim=1, keepdim=True) / illuminant.clamp_min(1e-6)  # a black image keeps gain ~0: black
    return (images * gain).clamp(0, 255)
