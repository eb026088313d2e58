import numpy as np
import torch

from src.config import CLASSES, ModelParams
from src.learn.model import Probabilities, build_model
from src.learn.ood_guard import fit_guard
from src.learn.triage import FLAG_COLUMNS, Triage, split_output


def served(size: int = 32) -> Probabilities:
    torch.manual_seed(0)
    params = ModelParams(name="vit_tiny_patch16_224", pretrained=False, patch_size=8)
    return Probabilities(build_model(params, size), tta=True, temperature=1.5).eval()


def test_triage_answers_the_served_probabilities_and_flags_from_its_thresholds():
    model = served()
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        probs = model(images).numpy()
        features = model.classifier.features(images).numpy()
    guard = fit_guard(features, np.arange(6) % 2, features, keep=0.5)
    threshold = float(np.median(probs.max(axis=1)))
    with torch.inference_mode():
        answer = Triage(model, threshold, guard).eval()(images).numpy()
    assert answer.shape == (6, len(CLASSES) + len(FLAG_COLUMNS))
    got, flags = split_output(answer)
    np.testing.assert_allclose(got, probs, atol=1e-6)
    assert flags["referred"].tolist() == (probs.max(axis=1) < threshold).tolist()
    assert flags["out_of_distribution"].tolist() == (flags["ood_distance"] > float(guard.threshold)).tolist()
    assert 0 < flags["out_of_distribution"].sum() < 6


def test_without_a_rule_nothing_is_referred_or_flagged_and_old_answers_read_the_same():
    model = served()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        answer = Triage(model).eval()(images).numpy()
    _, flags = split_output(answer)
    assert not flags["referred"].any() and not flags["out_of_distribution"].any()
    assert flags["ood_distance"].isna().all()
    probs, legacy = split_output(answer[:, : len(CLASSES)])  # a model registered before the flags
    assert probs.shape == (2, len(CLASSES)) and list(legacy.columns) == list(FLAG_COLUMNS)
    assert not legacy["referred"].any() and legacy["ood_distance"].isna().all()
