"""The served model's whole answer: class probabilities, whether to refer the case, and whether the input looks
like the images the model was trained on at all.

`Triage` wraps the `Probabilities` decision with the referral threshold and the OOD guard, in one module so that
evaluate, the exported MLflow model, serving, `src.predict` and the demo page compute the flags from the same pass
and the same stored numbers. Its output is one float tensor, (N, classes + 3), because an export serves one tensor:
the probabilities in CLASSES order, then the columns of FLAG_COLUMNS.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from src.config import CLASSES
from src.learn.model import Probabilities, combine_views
from src.learn.ood_guard import OodGuard

# referred: the top probability is below the referral threshold (refer to a dermatologist);
# out_of_distribution: the guard's distance is above its threshold (not a dermoscopy image like the training ones);
# ood_distance: that distance (NaN for a model served without a guard)
FLAG_COLUMNS = ("referred", "out_of_distribution", "ood_distance")


class Triage(nn.Module):
    """uint8 NHWC images -> (N, classes + 3): probabilities, referred, out_of_distribution, ood_distance."""

    def __init__(self, served: Probabilities, referral_threshold: float | None = None, guard: OodGuard | None = None):
        super().__init__()
        self.served = served
        self.guard = guard
        self.register_buffer("referral_threshold", torch.tensor(float(referral_threshold or 0.0)))

    @property
    def classifier(self):
        return self.served.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, features = self.served.view_outputs(images)
        probs = combine_views(logits, self.served.temperature, self.served.offsets)
        referred = (probs.max(dim=1).values < self.referral_threshold).float()
        if self.guard is None:
            distance = torch.full_like(referred, float("nan"))
            unlike = torch.zeros_like(referred)
        else:
            distance = self.guard(features)
            unlike = (distance > self.guard.threshold).float()
        return torch.cat([probs, referred[:, None], unlike[:, None], distance[:, None]], dim=1)

    def decision(self) -> dict:
        """The whole rule as plain values (the decision, the referral and guard thresholds), for reports, the model
        card and the demo page."""
        guard = None if self.guard is None else round(float(self.guard.threshold), 4)
        rule = {"referral_threshold": round(float(self.referral_threshold), 6), "ood_threshold": guard}
        return self.served.decision() | rule


def split_output(output: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """A served answer -> the class probabilities and a frame of FLAG_COLUMNS (referred and out_of_distribution as
    booleans). Models registered before the flags answer probabilities only: nothing referred, no distance."""
    probs = output[:, : len(CLASSES)]
    if output.shape[1] == len(CLASSES):
        flags = np.column_stack([np.zeros(len(output)), np.zeros(len(output)), np.full(len(output), np.nan)])
    else:
        flags = output[:, len(CLASSES) :]
    frame = pd.DataFrame(flags, columns=list(FLAG_COLUMNS))
    return probs, frame.astype({"referred": bool, "out_of_distribution": bool})
