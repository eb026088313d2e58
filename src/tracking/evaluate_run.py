"""The evaluate stage as one tracked run: test-set metrics, predictions and plots, logged and registered in MLflow."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from src.config import CLASSES, Params
from src.fileio import write_json, write_text
from src.ingest.rawdata import DataError
from src.learn.data import load_split, make_loader
from src.learn.engine import predict, select_device
from src.learn.inference import load_trained
from src.learn.metrics import confusion, full_metrics, roc_curves
from src.learn.model import Classifier
from src.tracking import runs as tracking
from src.tracking.plots import confusion_png, roc_png

log = logging.getLogger(__name__)
ISIC_TEST = "isic2018_test"


def predictions_frame(frame: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs, columns=list(CLASSES))
    out.insert(0, "image_id", frame["image_id"].to_numpy())
    out.insert(1, "dx", frame["dx"].to_numpy())
    out["predicted"] = [CLASSES[k] for k in probs.argmax(axis=1)]
    return out


def evaluate_split(model: Classifier, params: Params, name: str, image_size: int, device: torch.device) -> dict:
    """Metrics, predictions CSV and plots for one split; returns metrics under the split's prefix."""
    split = load_split(params.paths, name)
    if split.dataset.image_size != image_size:
        raise DataError(
            f"{split.dataset.cache_file}: images are {split.dataset.image_size} px but the model was "
            f"trained at {image_size} px; rerun `dvc repro` so split and train agree"
        )
    loader = make_loader(split.dataset, params.evaluate.batch_size, device, params.train.num_workers)
    probs, labels = predict(model, loader, device)
    reports = params.paths.reports
    suffix = "" if name == "test" else f"_{name}"
    preds = predictions_frame(split.frame, probs)
    write_text(reports / f"predictions{suffix}.csv", preds.to_csv(index=False))
    write_text(
        reports / f"confusion{suffix}.csv",
        preds.rename(columns={"dx": "actual"})[["actual", "predicted"]].to_csv(index=False),
    )
    curves = roc_curves(labels, probs)
    roc = pd.concat([pd.DataFrame({"class": c, "fpr": f, "tpr": t}) for c, (f, t) in curves.items()])
    write_text(reports / f"roc{suffix}.csv", roc.to_csv(index=False))
    metrics = full_metrics(labels, probs)
    confusion_png(confusion(labels, probs), reports / f"confusion_matrix{suffix}.png", f"{name}: confusion")
    roc_png(
        curves,
        {c: metrics[f"roc_auc_{c}"] for c in CLASSES},
        reports / f"roc_curves{suffix}.png",
        f"{name}: ROC (one vs rest)",
    )
    log.info(
        "%s: balanced accuracy %.4f, accuracy %.4f, macro AUC %.4f (%d images)",
        name,
        metrics["balanced_accuracy"],
        metrics["accuracy"],
        metrics["macro_roc_auc"],
        len(labels),
    )
    return {f"{name}/{k}": v for k, v in metrics.items()} | {f"{name}/images": len(labels)}


def evaluate(params: Params) -> dict[str, float]:
    """The evaluate stage: score the best model, write reports, log to its MLflow run, register it."""
    device = select_device(params.train.device)
    model, ckpt = load_trained(params.paths.models / "best.pt")
    model.to(device)
    image_size = ckpt["config"]["data"]["image_size"]
    splits = ["test"] + ([ISIC_TEST] if (params.paths.splits / f"{ISIC_TEST}.csv").exists() else [])
    metrics: dict[str, float] = {}
    for name in splits:
        metrics |= evaluate_split(model, params, name, image_size, device)
    write_json(params.paths.reports / "evaluate.json", {k: (None if np.isnan(v) else v) for k, v in metrics.items()})
    tracking.connect(params.tracking)
    with tracking.run(run_id=ckpt.get("mlflow_run_id") or None, tags=tracking.provenance(params.paths)) as active:
        tracking.log_metrics(metrics)
        for png in sorted(params.paths.reports.glob("*.png")):
            tracking.log_artifact(png, "evaluation")
        tracking.log_artifact(params.paths.reports / "evaluate.json", "evaluation")
        if ckpt.get("model_uri"):
            result = tracking.register(
                ckpt["model_uri"], active.info.run_id, metrics, params.tracking, params.evaluate.promote_metric
            )
            tracking.set_tags({"registry.version": result["version"], "registry.champion": result["promoted"]})
        else:
            log.warning("the checkpoint has no logged MLflow model (tracking.log_model: false); nothing registered")
    return metrics
