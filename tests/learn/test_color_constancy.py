"""Shades of Gray colour constancy: a grey world is left alone, a colour cast is removed, and the model applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.config import ModelParams
from src.learn.color_constancy import shades_of_gray
from src.learn.model import build_model


def grey_world(seed: int = 0) -> torch.Tensor:
    """(1, 3, 32, 32): the three channels hold the same values in different places, so share every p-mean."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(20, 200, 32 * 32)
    channels = [rng.permutation(values).reshape(32, 32) for _ in range(3)]
    return torch.tensor(np.stack(channels)[None], dtype=torch.float32)


@pytest.mark.parametrize("power", [1.0, 6.0])
def test_a_grey_world_image_is_unchanged(power):
    image = grey_world()
    torch.testing.assert_close(shades_of_gray(image, power), image, rtol=1e-5, atol=1e-3)


def test_a_colour_cast_is_corrected():
    image = grey_world(1)
    cast = image * torch.tensor([1.2, 1.0, 0.75]).view(1, 3, 1, 1)  # a warm illuminant; no pixel passes 255
    corrected = shades_of_gray(cast, 6.0)
    # the cast is gone: what is left is the original up to one brightness factor for all channels
    ratio = corrected / image
    assert ratio.std() < 1e-3 * ratio.mean()
    assert (cast / image).std() > 0.1


def test_a_black_image_stays_black_and_finite():
    out = shades_of_gray(torch.zeros(2, 3, 8, 8), 6.0)
    assert torch.isfinite(out).all() and not out.any()


def test_the_model_applies_it_in_its_input_layer():
    params = ModelParams(name="test_vit", pretrained=False, dropout=0.0, drop_path=0.0)
    torch.manual_seed(0)
    plain = build_model(params, 32).eval()
    corrected = build_model(params, 32, shades_of_gray_power=6.0).eval()
    corrected.load_state_dict(plain.state_dict())
    image = grey_world(2).permute(0, 2, 3, 1).round().to(torch.uint8)
    cast = (image.float() * torch.tensor([1.2, 1.0, 0.75])).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(plain(image), plain(cast), atol=1e-3)  # the cast changes the plain model's answer
        expected = plain(shades_of_gray(cast.permute(0, 3, 1, 2).float(), 6.0).permute(0, 2, 3, 1))
        torch.testing.assert_close(corrected(cast), expected)  # the corrected model sees the corrected pixels
