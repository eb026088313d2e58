"""The shift report: the served model scored under acquisition shifts (src.learn.shifts) on a fixed subset of a
split; metrics `shift/<split>/...`, reports/shift.csv (test) and shift_val.csv, and a plot of each."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from src.config import Params
from src.fileio import write_text
from src.learn.data import load_split, make_loader
from src.learn.engine import predict
from src.learn.metrics import balanced_accuracy
from src.learn.model import Probabilities
from src.learn.shifts import conditions, perturb_images, shift_subset
from src.tracking.plots import shift_png

log = logging.getLogger(__name__)


def one_view(served: Probabilities) -> Probabilities:
    """The served decision (temperature, offsets) on one view per image: eight views of every perturbed image
    would cost eight times as much, and TTA's 90-degree turns are no acquisition shift."""
    return Probabilities(served.classifier, False, served.offsets, float(served.temperature)).eval()


def score(model: Probabilities, images: np.ndarray, labels: np.ndarray, params: Params, device) -> float:
    """Balanced accuracy of the model on a uint8 batch."""
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    loader = make_loader(dataset, params.evaluate.batch_size, device, 0)
    probs, _ = predict(model, loader, device, softmax=False)
    return balanced_accuracy(labels, probs)


def shift_table(served: Probabilities, images: np.ndarray, labels: np.ndarray, params: Params, device) -> pd.DataFrame:
    """Balanced accuracy per shift and severity level, with the clean images first and the drop from clean."""
    model = one_view(served)
    clean = score(model, images, labels, params, device)
    rows = [{"shift": "clean", "severity": 0, "setting": "as recorded", "balanced_accuracy": clean}]
    for shift, level in conditions():
        bacc = score(model, perturb_images(images, shift, level), labels, params, device)
        rows.append(
            {"shift": shift.name, "severity": level, "setting": shift.setting(level), "balanced_accuracy": bacc}
        )
    table = pd.DataFrame(rows)
    table["drop"] = clean - table["balanced_accuracy"]
    table["condition"] = table["shift"] + np.where(table["severity"] > 0, " " + table["severity"].astype(str), "")
    table.insert(0, "images", len(labels))
    return table


def shift_metrics(table: pd.DataFrame, name: str) -> dict[str, float]:
    """MLflow metrics of one split's table: each condition, each shift's mean, and the shift score (the mean over
    all conditions) with its drop from clean and the worst condition."""
    shifted = table[table["severity"] > 0]
    clean = float(table.loc[table["severity"] == 0, "balanced_accuracy"].iloc[0])
    metrics = {f"shift/{name}/{r.shift}_{r.severity}": float(r.balanced_accuracy) for r in shifted.itertuples()}
    metrics |= {f"shift/{name}/{k}": float(v) for k, v in shifted.groupby("shift")["balanced_accuracy"].mean().items()}
    score_ = float(shifted["balanced_accuracy"].mean())
    metrics |= {
        f"shift/{name}/clean": clean,
        f"shift/{name}/score": score_,
        f"shift/{name}/drop": clean - score_,
        f"shift/{name}/worst": float(shifted["balanced_accuracy"].min()),
        f"shift/{name}/images": float(table["images"].iloc[0]),
    }
    return metrics


def shift_report(served: Probabilities, params: Params, name: str, device) -> dict[str, float]:
    """Score the served model under every shift on the split's fixed subset; write its CSV and plot."""
    started = time.perf_counter()
    split = load_split(params.paths, name)
    labels = split.dataset.labels
    subset = shift_subset(labels, split.frame["lesion_id"].to_numpy(), params.evaluate.shift_per_class)
    images = np.stack([np.asarray(split.dataset.images[row]) for row in split.dataset.rows[subset]])
    table = shift_table(served, images, labels[subset], params, device)
    write_reports(table, params.paths.reports, name)
    metrics = shift_metrics(table, name)
    seconds = time.perf_counter() - started
    log.info(
        "%s shift report (%d images x %d conditions, one view, %.0f s): clean %.4f, shift score %.4f (drop %.4f), "
        "worst %.4f",
        name,
        len(subset),
        len(table) - 1,
        seconds,
        metrics[f"shift/{name}/clean"],
        metrics[f"shift/{name}/score"],
        metrics[f"shift/{name}/drop"],
        metrics[f"shift/{name}/worst"],
    )
    return metrics | {f"shift/{name}/seconds": seconds}


def write_reports(table: pd.DataFrame, reports: Path, name: str) -> None:
    suffix = "" if name == "test" else f"_{name}"
    write_text(reports / f"shift{suffix}.csv", table.to_csv(index=False, float_format="%.4f"))
    title = f"{name}: balanced accuracy under acquisition shifts ({int(table['images'].iloc[0])} images, one view)"
    shift_png(table, reports / f"shift{suffix}.png", title)
