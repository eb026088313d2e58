"""The out-of-distribution guard: how unlike the training images an input is, and where "unlike" begins.

The score is the Mahalanobis distance of the model's pooled features to the nearest class mean, with one covariance
shared by all classes (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"):
means and covariance from the training split (the covariance shrunk by Ledoit-Wolf, since 192-384 features are
many for the rare classes), and the threshold at the distance that keeps `keep` of the validation images. A
holiday photo, a screenshot or a flat colour lies far from every lesion class in that space, even where the
softmax over the seven classes is confident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sklearn.covariance import LedoitWolf
from torch import nn

from src.fileio import atomic_path
from src.learn.checkpoint import CheckpointError

GUARD_FILE = "ood_guard.safetensors"  # written by evaluate beside best.pt


class OodGuard(nn.Module):
    """Pooled features (N, D) -> the distance to the nearest training class (N,); above `threshold` is out of
    distribution."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32).clone())
        self.register_buffer("precision", torch.as_tensor(precision, dtype=torch.float32).clone())
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        diff = features.float()[:, None, :] - self.means[None]  # (N, classes, D)
        squared = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return squared.min(dim=1).values.clamp_min(0).sqrt()


def fit_guard(train: np.ndarray, labels: np.ndarray, val: np.ndarray, keep: float) -> OodGuard:
    """Class means and the shared, shrunk covariance from the training features; the threshold keeps `keep` of
    the validation images (fitted on images the means never saw, so 1 - keep is the rate on new lesion images)."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    guard = OodGuard(torch.from_numpy(means), torch.from_numpy(precision), 0.0)
    guard.threshold.fill_(keeping_threshold(distances(guard, val), keep))
    return guard


def keeping_threshold(scores: np.ndarray, keep: float) -> float:
    """A threshold that keeps at least `keep` of these scores, halfway between the last kept and the first one
    above: no score sits on it, so float noise between two paths that compute a score cannot flip a flag."""
    ordered = np.sort(scores)
    last = min(int(np.ceil(keep * len(ordered))), len(ordered)) - 1
    if last + 1 == len(ordered):
        return float(ordered[-1] * 1.01 + 1e-6)  # keeps all: a little above the farthest
    return float((ordered[last] + ordered[last + 1]) / 2)


def distances(guard: OodGuard, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return guard(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()


def save_guard(path: Path, guard: OodGuard, checkpoint: str) -> None:
    """The guard beside the checkpoint it was fitted for (safetensors: loading it runs no code)."""
    tensors = {name: t.contiguous() for name, t in guard.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"checkpoint": checkpoint})


def load_guard(path: Path, checkpoint: str) -> OodGuard | None:
    """The guard saved for this checkpoint; None where evaluate fitted none for it (or none at all)."""
    if not Path(path).exists():
        return None
    try:
        with safe_open(str(path), "pt") as stored:
            saved_for = (stored.metadata() or {}).get("checkpoint")
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a guard file ({err}); rerun `python -m src.evaluate`") from err
    if saved_for != checkpoint:
        return None
    return OodGuard(tensors["means"], tensors["precision"], float(tensors["threshold"]))
