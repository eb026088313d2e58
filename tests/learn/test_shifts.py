"""The shift report's perturbations: deterministic, each one a real change, and a fixed lesion-stratified subset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from src.learn.data import RandomDefocus
from src.learn.shifts import SHIFTS, conditions, perturb_images, shift_subset


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four lesion-like 128 px images (the CPU profiles' size): a dark blob on skin tone with some texture."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    blob = np.exp(-((yy - 64) ** 2 + (xx - 60) ** 2) / 900.0)[..., None]
    skin = np.array([220.0, 160.0, 140.0])
    base = skin * (1 - 0.7 * blob) + rng.normal(0, 6, (4, 128, 128, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("shift", "level"), conditions(), ids=lambda v: getattr(v, "name", str(v)))
def test_every_condition_is_deterministic_and_changes_the_pixels(images, shift, level):
    first = perturb_images(images, shift, level)
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, perturb_images(images.copy(), shift, level))  # same seed, same pixels
    assert np.abs(first.astype(int) - images).mean() > 0.2  # a real shift, not a no-op
    assert not np.array_equal(first, perturb_images(images, shift, level, seed=1)) or shift.name in {
        "contrast",
        "defocus",
        "jpeg",
        "low_resolution",
        "zoom",
    }  # those with randomness draw it from the seed


def test_stronger_severities_move_pixels_further(images):
    for shift in SHIFTS:
        if shift.name in {"rotation", "gamma", "brightness"}:  # a random sign per image: compare like with like
            continue
        change = [
            np.abs(perturb_images(images, shift, k).astype(int) - images).mean() for k in (1, len(shift.severities))
        ]
        assert change[0] < change[1], shift.name


def test_each_image_draws_its_own_perturbation(images):
    same = np.stack([images[0]] * 4)
    cast = next(s for s in SHIFTS if s.name == "colour_cast")
    out = perturb_images(same, cast, 2)
    assert not np.array_equal(out[0], out[1])  # not one cast for the whole batch


def test_subset_takes_one_image_per_lesion_at_most_per_class_of_each_class_and_is_fixed():
    rng = np.random.default_rng(3)
    lesions = np.repeat(np.arange(300), 2)  # two images per lesion
    labels = np.repeat(rng.choice(7, 300, p=[0.05, 0.05, 0.1, 0.02, 0.1, 0.65, 0.03]), 2)
    subset = shift_subset(labels, lesions, per_class=20)
    assert len(np.unique(lesions[subset])) == len(subset)
    counts = np.bincount(labels[subset], minlength=7)
    lesion_counts = np.bincount(labels[::2], minlength=7)
    np.testing.assert_array_equal(counts, np.minimum(lesion_counts, 20))
    np.testing.assert_array_equal(subset, shift_subset(labels, lesions, per_class=20))


def test_trainings_defocus_draws_and_blurs_as_torchvisions_gaussian_blur():
    # RandomDefocus replaced v2.GaussianBlur (a full 2-D kernel, 20x slower at 224 px): the same sigma drawn from the
    # same stream, the same pixels away from the borders (the two pad differently) up to rounding
    max_sigma, margin = 3.0, 10
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8))
    reference = v2.GaussianBlur(kernel_size=2 * math.ceil(3 * max_sigma) + 1, sigma=(0.1, max_sigma))
    spreads = []
    for seed in range(4):
        torch.manual_seed(seed)
        ours, after_ours = RandomDefocus(max_sigma)(img), torch.rand(2)
        torch.manual_seed(seed)
        theirs, after_theirs = reference(img), torch.rand(2)
        assert torch.equal(after_ours, after_theirs)  # one draw each: the rest of the stream is unchanged
        diff = (ours.int() - theirs.int())[:, margin:-margin, margin:-margin].abs()
        assert diff.max() <= 1
        spreads.append(float(ours.float().std() / img.float().std()))
    assert min(spreads) < 0.5 and max(spreads) > min(spreads) + 0.1  # it blurs, by the sigma drawn
