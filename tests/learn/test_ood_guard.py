import numpy as np
import pytest
import torch

from src.learn.checkpoint import CheckpointError
from src.learn.ood_guard import distances, fit_guard, keeping_threshold, load_guard, save_guard


def lesion_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of three classes, each a cloud around its own mean."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    means = np.array([[4.0] * 8, [-4.0] * 8, [4.0, -4.0] * 4])
    return means[labels] + rng.normal(size=(n, 8)), labels


def test_the_guard_keeps_val_and_flags_what_lies_far_from_every_class():
    train, labels = lesion_like(600, 0)
    val, _ = lesion_like(200, 1)
    guard = fit_guard(train, labels, val, keep=0.95)
    assert (distances(guard, val) <= float(guard.threshold)).mean() >= 0.95
    new_lesions, _ = lesion_like(400, 2)  # the same distribution: about 5% flagged
    assert (distances(guard, new_lesions) > float(guard.threshold)).mean() < 0.12
    far = np.zeros((3, 8)) + np.array([[0.0], [12.0], [-30.0]])  # between the classes, and far out
    assert (distances(guard, far) > float(guard.threshold)).all()


def test_no_score_sits_on_the_threshold():
    scores = np.arange(20.0)
    assert keeping_threshold(scores, 0.95) == 18.5  # 19 of 20 kept
    assert keeping_threshold(scores, 0.999) > 19  # all kept


def test_a_saved_guard_loads_only_for_its_checkpoint(tmp_path):
    train, labels = lesion_like(300, 0)
    guard = fit_guard(train, labels, lesion_like(100, 1)[0], keep=0.9)
    path = tmp_path / "ood_guard.safetensors"
    save_guard(path, guard, "run-a:3")
    loaded = load_guard(path, "run-a:3")
    features = torch.from_numpy(train[:5]).float()
    torch.testing.assert_close(loaded(features), guard(features))
    assert float(loaded.threshold) == float(guard.threshold)
    assert load_guard(path, "run-b:1") is None  # another model's guard is not applied
    assert load_guard(tmp_path / "none.safetensors", "run-a:3") is None
    path.write_bytes(b"not a guard")
    with pytest.raises(CheckpointError, match="ood_guard.safetensors: not a guard file"):
        load_guard(path, "run-a:3")
