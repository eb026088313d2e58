"""Temperature scaling, ECE and Brier: they measure what they claim and the fit makes confidence honest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.config import ModelParams
from src.learn.calibration import brier_score, expected_calibration_error, fit_temperature, reliability, served_probs
from src.learn.model import AllViews, Probabilities, build_model


def sharpened(n: int, sharpness: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 7) logits whose softmax is the true label distribution, times `sharpness` (> 1: overconfident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (n, 7))
    true_probs = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(7, p=p) for p in true_probs])
    return (true_logits * sharpness)[:, None, :], labels


def test_ece_and_brier_of_known_cases():
    labels = np.array([0, 1, 2, 3])
    perfect = np.eye(7)[labels]
    assert expected_calibration_error(perfect, labels) == 0 and brier_score(perfect, labels) == 0
    wrong = np.eye(7)[[1, 2, 3, 4]]  # sure and always wrong: gap 1 in the top bin, Brier 2 per image
    assert expected_calibration_error(wrong, labels) == pytest.approx(1) and brier_score(wrong, labels) == 2
    half = np.full((4, 7), 0.5 / 6)
    half[np.arange(4), [0, 1, 3, 5]] = 0.5  # confidence 0.5, right half the time: calibrated
    assert expected_calibration_error(half, labels) == pytest.approx(0)
    table = reliability(half, labels)
    assert list(table["count"]) == [4] and table["accuracy"].iloc[0] == 0.5


def test_an_overconfident_model_gets_a_temperature_above_one_and_a_lower_ece():
    logits, labels = sharpened(4000, sharpness=3.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)  # undoes the sharpening
    before = expected_calibration_error(served_probs(logits), labels)
    after = expected_calibration_error(served_probs(logits, temperature), labels)
    assert after < before / 3 and after < 0.03
    assert brier_score(served_probs(logits, temperature), labels) < brier_score(served_probs(logits), labels)
    np.testing.assert_array_equal(served_probs(logits).argmax(1), served_probs(logits, temperature).argmax(1))


def test_the_served_module_and_evaluates_formula_agree_and_its_pass_gives_the_guards_features():
    torch.manual_seed(0)
    classifier = build_model(ModelParams(name="test_vit", pretrained=False), 32).eval()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    offsets = torch.tensor([0.0, 0.3, -0.2, 0.0, 0.5, -1.0, 0.1])
    with torch.inference_mode():
        all_views = AllViews(classifier)
        views, features = all_views.split(all_views(images).numpy())
        # view 0's pooled features, which the OOD guard measures, are the image's own from the same pass
        np.testing.assert_array_equal(features, classifier.features(images).numpy())
        for tta in (False, True):
            served = Probabilities(classifier, tta, offsets, temperature=1.7)(images).numpy()
            np.testing.assert_allclose(
                served_probs(views if tta else views[:, :1], 1.7, offsets.numpy()), served, atol=1e-6
            )
