"""The decision rule: TTA and per-class offsets fitted on val, applied identically everywhere."""

import numpy as np
import torch

from src.config import ModelParams
from src.learn.decision import apply_offsets, fit_offsets, held_out_offsets
from src.learn.metrics import balanced_accuracy
from src.learn.model import Probabilities, build_model, dihedral_views


def _under_predicted_class(n=400, seed=0):
    """Probabilities of a model that calls most class-2 images class 0 although class 2 scores high."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[labels]
    logits[:, 2] -= 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_offsets_raise_balanced_accuracy_and_generalise_to_fresh_data():
    probs, labels = _under_predicted_class()
    offsets = fit_offsets(probs, labels)
    assert offsets[0] == 0 and offsets[2] > 1.0
    fresh, fresh_labels = _under_predicted_class(seed=1)
    before, after = (
        balanced_accuracy(fresh_labels, fresh),
        balanced_accuracy(fresh_labels, apply_offsets(fresh, offsets)),
    )
    assert after > before + 0.1


def test_held_out_offsets_are_fitted_on_the_other_lesions_and_do_not_flatter_noise():
    rng = np.random.default_rng(0)
    labels, lesions = rng.integers(0, 7, 600), rng.integers(0, 250, 600)  # several images per lesion
    probs = rng.dirichlet(np.ones(7), 600)  # no signal: offsets can only fit the images they see
    folds = held_out_offsets(probs, labels, lesions)
    held = np.concatenate([h for h, _ in folds])
    assert sorted(held) == list(range(600))  # every image scored once
    assert not set(lesions[folds[0][0]]) & set(lesions[folds[1][0]])  # no lesion on both sides
    for h, offsets in folds:
        rest = np.setdiff1d(np.arange(600), h)
        np.testing.assert_array_equal(offsets, fit_offsets(probs[rest], labels[rest]))
    in_sample = balanced_accuracy(labels, apply_offsets(probs, fit_offsets(probs, labels)))
    scored = np.empty_like(probs)
    for h, offsets in folds:
        scored[h] = apply_offsets(probs[h], offsets)
    assert in_sample > balanced_accuracy(labels, scored) + 0.02  # fitted to noise, it only looks better in sample


def test_offsets_stay_zero_when_nothing_can_be_gained():
    labels = np.arange(30) % 3
    probs = np.full((30, 3), 0.1)
    probs[np.arange(30), labels] = 0.8
    assert np.array_equal(fit_offsets(probs, labels), np.zeros(3))


def test_applied_offsets_are_a_renormalised_reweighting():
    probs, _ = _under_predicted_class(n=10)
    out = apply_offsets(probs, np.array([0.0, 0.5, -1.0]))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    expected = probs * np.exp([0.0, 0.5, -1.0])
    np.testing.assert_allclose(out, expected / expected.sum(axis=1, keepdims=True), rtol=1e-6)


def test_tta_sees_all_eight_orientations_and_is_invariant_to_them():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    views = dihedral_views(images)
    assert len({v.numpy().tobytes() for v in views}) == 8
    torch.manual_seed(0)
    served = Probabilities(build_model(ModelParams(name="test_vit", pretrained=False), 32).eval(), tta=True)
    rotated = torch.rot90(images, 1, dims=(1, 2)).flip(2)
    with torch.inference_mode():
        torch.testing.assert_close(served(images), served(rotated), atol=1e-5, rtol=1e-5)


def test_served_module_applies_the_same_offsets_as_numpy():
    torch.manual_seed(0)
    classifier = build_model(ModelParams(name="test_vit", pretrained=False), 32).eval()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    offsets = np.array([0.0, 0.3, -0.2, 1.0, 0.0, -1.5, 0.4])
    with torch.inference_mode():
        plain = Probabilities(classifier)(images).numpy()
        served = Probabilities(classifier, offsets=torch.tensor(offsets, dtype=torch.float32))(images).numpy()
    np.testing.assert_allclose(served, apply_offsets(plain, offsets), atol=1e-6)
    assert Probabilities(classifier, True, torch.tensor(offsets), temperature=1.5).decision() == {
        "tta": True,
        "tta_views": 8,
        "temperature": 1.5,
        "offsets": [round(float(v), 4) for v in offsets],
    }
