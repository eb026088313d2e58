"""The evaluate stage as one tracked run: the decision rule fitted on val, test-set metrics, predictions and plots,
and the served model logged and registered in MLflow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from src.config import CLASSES, Params
from src.fileio import write_json, write_text
from src.ingest.rawdata import DataError, image_path
from src.learn.calibration import brier_score, expected_calibration_error, fit_temperature, reliability, served_probs
from src.learn.checkpoint import LAST_FILE, RESUME_DIR, CheckpointError
from src.learn.confusions import top_confusions
from src.learn.data import SplitData, load_split, make_loader
from src.learn.decision import fit_offsets, held_out_offsets
from src.learn.engine import predict, select_device
from src.learn.explain import DEFAULT_METHOD, METHODS, ExplainError, explain_map, gallery_picks
from src.learn.inference import CHECKPOINT_FILE, load_trained, probabilities, save_decision
from src.learn.metrics import balanced_accuracy, balanced_accuracy_interval, confusion, full_metrics, roc_curves
from src.learn.model import TTA_VIEWS, AllViews, Classifier, Probabilities
from src.prepare.index import ISIC_SPLIT
from src.tracking import registry
from src.tracking import runs as tracking
from src.tracking.model_card import CARD_FILE, write_model_card
from src.tracking.models import load_from_mlflow
from src.tracking.plots import confusion_png, explanation_gallery_png, reliability_png, roc_png
from src.tracking.shift_report import shift_report
from src.tracking.subgroup_report import subgroup_report
from src.tracking.triage_report import fit_triage, predictions_file, triage_report

log = logging.getLogger(__name__)
# The served model (TTA, temperature, offsets) on val: what the registry promotes on by default. Not `val/`, which
# holds training's per-epoch curve of the raw/EMA weights in the same run.
VAL_SERVED = "val_served/"
RESCORED_SPLITS = {VAL_SERVED: "val", "test/": "test"}  # promote-metric prefix -> the split it is recomputed on


def predictions_frame(frame: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs, columns=list(CLASSES))
    out.insert(0, "image_id", frame["image_id"].to_numpy())
    out.insert(1, "lesion_id", frame["lesion_id"].to_numpy())  # what `src.compare` resamples
    out.insert(2, "dx", frame["dx"].to_numpy())
    out["predicted"] = [CLASSES[k] for k in probs.argmax(axis=1)]
    return out


def split_loader(params: Params, name: str, image_size: int, device: torch.device) -> tuple[SplitData, DataLoader]:
    """One split of the cache and its loader; the cache must be at the size the model was trained at."""
    split = load_split(params.paths, name)
    if split.dataset.image_size != image_size:
        raise DataError(
            f"{split.dataset.cache_file}: images are {split.dataset.image_size} px but the model was "
            f"trained at {image_size} px; rerun `dvc repro` so split and train agree"
        )
    return split, make_loader(split.dataset, params.evaluate.batch_size, device, params.train.num_workers)


@dataclass
class SplitPass:
    """What evaluate's one pass over a split gives: the logits of its TTA views (N, evaluate.tta_views, classes), the
    pooled features of view 0 (the OOD guard's input), the labels, and the split."""

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    split: SplitData


def split_pass(classifier: Classifier, params: Params, name: str, image_size: int, device: torch.device) -> SplitPass:
    split, loader = split_loader(params, name, image_size, device)
    views = AllViews(classifier, params.evaluate.tta_views)
    out, labels = predict(views, loader, device, softmax=False)
    return SplitPass(*views.split(out), labels, split)


class PooledFeatures(torch.nn.Module):
    """The classifier's pooled features (what the OOD guard measures), for engine.predict."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


# Class means and a 192-384-dimensional shrunk covariance are estimated well from this many images per class; all of
# train would add a pass as long as a third of evaluate's 8-view passes over val and test.
GUARD_TRAIN_PER_CLASS = 300


def per_class_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `per_class` images of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def guard_features(classifier: Classifier, params: Params, device: torch.device, passes: dict[str, SplitPass]) -> dict:
    """(pooled features, labels) of the image as it is, for the OOD guard (none when it is off): a per-class subset
    of train, one view each, and the evaluated splits whole from their passes (view 0 is the image as it is)."""
    if params.evaluate.ood_keep is None:
        return {}
    split = load_split(params.paths, "train")
    subset = Subset(split.dataset, per_class_subset(split.dataset.labels, GUARD_TRAIN_PER_CLASS))
    loader = make_loader(subset, params.evaluate.batch_size, device, params.train.num_workers)
    features = {"train": predict(PooledFeatures(classifier), loader, device, softmax=False)}
    return features | {name: (one.features, one.labels) for name, one in passes.items()}


def choose_temperature(logits: np.ndarray, labels: np.ndarray, calibrate: bool | str) -> tuple[float, float, dict]:
    """The NLL-fitted temperature, the one served (fitted, or 1 where `auto` finds it does not lower val ECE), and
    val ECE uncalibrated, fitted and served."""
    fitted = fit_temperature(logits, labels) if calibrate else 1.0
    calibration = {
        "ece_uncalibrated": expected_calibration_error(served_probs(logits), labels),
        "ece_fitted": expected_calibration_error(served_probs(logits, fitted), labels),
    }
    # NLL's best temperature can still raise ECE (a model already calibrated, e.g. by label smoothing + TTA)
    improves = calibration["ece_fitted"] < calibration["ece_uncalibrated"]
    temperature = fitted if calibrate is True or (calibrate == "auto" and improves) else 1.0
    calibration["ece"] = expected_calibration_error(served_probs(logits, temperature), labels)
    return fitted, temperature, calibration


def fit_decision(classifier: Classifier, params: Params, val: SplitPass) -> tuple[Probabilities, dict[str, float]]:
    """The served model, fitted on the val split: TTA when asked (or, for `auto`, when it helps on val), the
    temperature (when `evaluate.calibrate`), then the prior correction; with metrics (decision/) that say what
    each part did on val."""
    logits, labels, split = val.logits, val.labels, val.split
    bacc = {
        "plain": balanced_accuracy(labels, served_probs(logits[:, :1])),
        "tta": balanced_accuracy(labels, served_probs(logits)),
    }
    use_tta = bacc["tta"] > bacc["plain"] if params.evaluate.tta == "auto" else bool(params.evaluate.tta)
    all_logits, logits = logits, logits if use_tta else logits[:, :1]
    fitted, temperature, calibration = choose_temperature(logits, labels, params.evaluate.calibrate)
    probs = served_probs(logits, temperature)
    offsets = fit_offsets(probs, labels) if params.evaluate.prior_correction else np.zeros(len(CLASSES))
    offsets_t = torch.tensor(offsets, dtype=torch.float32)
    served = Probabilities(classifier, use_tta, offsets_t, temperature, params.evaluate.tta_views)
    served_val = served_probs(logits, temperature, offsets)  # exactly what the served model answers on val
    bacc["corrected"] = balanced_accuracy(labels, served_val)
    if params.evaluate.prior_correction:  # val_served: each lesion with offsets fitted on the other half of val
        served_val = out_of_fold(logits, probs, labels, split.frame["lesion_id"].to_numpy(), temperature)
        bacc["corrected_out_of_fold"] = balanced_accuracy(labels, served_val)
        log.info(
            "val with the prior correction fitted on the other half of its lesions: %.4f (val_served)",
            bacc["corrected_out_of_fold"],
        )
    log.info(
        "val: balanced accuracy plain %.4f, TTA %.4f (%s), with prior correction %.4f (fitted here; offsets %s); "
        "temperature %.3f fitted (%s): ECE %.4f -> %.4f",
        bacc["plain"],
        bacc["tta"],
        "used" if use_tta else "not used",
        bacc["corrected"],
        served.decision()["offsets"],
        fitted,
        "used" if temperature != 1.0 else "not used",
        calibration["ece_uncalibrated"],
        calibration["ece_fitted"],
    )
    write_text(
        params.paths.reports / "predictions_val.csv", predictions_frame(split.frame, served_val).to_csv(index=False)
    )
    metrics = served_metrics(labels, served_val, split.frame, VAL_SERVED)
    metrics |= {f"decision/val_balanced_accuracy_{k}": v for k, v in bacc.items()}
    metrics |= {f"decision/val_{k}": v for k, v in calibration.items()}
    metrics |= {"decision/tta": float(use_tta), "decision/temperature": temperature}
    metrics |= {"decision/tta_views": float(served.views)} | views_metrics(all_logits, labels)
    metrics |= {"decision/temperature_fitted": fitted}
    return served, metrics | {f"decision/offset_{c}": float(v) for c, v in zip(CLASSES, offsets, strict=True)}


def views_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Val balanced accuracy of the mean over the first 1, 2, 4, ... views evaluate computed (each a symmetric set):
    what fewer TTA views would cost, from the same pass."""
    counts = [1, *(k for k in TTA_VIEWS if k <= logits.shape[1])]
    key = "decision/val_balanced_accuracy_views_{}"
    return {key.format(k): balanced_accuracy(labels, served_probs(logits[:, :k])) for k in counts}


def out_of_fold(
    logits: np.ndarray, probs: np.ndarray, labels: np.ndarray, lesions: np.ndarray, temperature: float
) -> np.ndarray:
    """The served formula on val with every image's prior-correction offsets fitted on the other fold of lesions."""
    scored = np.empty_like(probs)
    for held, offsets in held_out_offsets(probs, labels, lesions):
        scored[held] = served_probs(logits[held], temperature, offsets)
    return scored


def served_metrics(labels: np.ndarray, probs: np.ndarray, frame: pd.DataFrame, prefix: str) -> dict[str, float]:
    """Everything full_metrics reports, with the lesion-bootstrap interval of balanced accuracy, under `prefix`
    (every split index has a lesion_id; the ISIC test set's is the image id, it publishes no groupings)."""
    low, high = balanced_accuracy_interval(labels, probs, frame["lesion_id"].to_numpy())
    metrics = full_metrics(labels, probs) | {"balanced_accuracy_ci_low": low, "balanced_accuracy_ci_high": high}
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def split_metrics(served: Probabilities, params: Params, name: str, one: SplitPass) -> dict:
    """Metrics, predictions CSV and plots for one split with the served decision, from its pass over its views;
    returns metrics under the split's prefix, with balanced accuracy without the prior correction and without
    TTA, and calibration (ECE, Brier) with and without the temperature."""
    logits, labels, split = one.logits, one.labels, one.split
    served_logits = logits if served.tta else logits[:, :1]
    temperature, offsets = float(served.temperature), served.offsets.cpu().numpy()
    probs = served_probs(served_logits, temperature, offsets)
    uncalibrated = served_probs(served_logits)
    metrics = served_metrics(labels, probs, split.frame, "") | {
        "balanced_accuracy_no_correction": balanced_accuracy(labels, served_probs(served_logits, temperature)),
        "balanced_accuracy_no_tta_no_correction": balanced_accuracy(labels, served_probs(logits[:, :1])),
        "ece": expected_calibration_error(probs, labels),
        "ece_uncalibrated": expected_calibration_error(uncalibrated, labels),
        "brier": brier_score(probs, labels),
        "brier_uncalibrated": brier_score(uncalibrated, labels),
    }
    write_split_reports(split.frame, labels, probs, metrics, params.paths.reports, name)
    eces = {"uncalibrated": metrics["ece_uncalibrated"], "calibrated": metrics["ece"]}
    write_calibration_reports(labels, uncalibrated, probs, eces, params.paths.reports, name)
    write_explanations(served.classifier, split, labels, probs, params.paths.reports, name)
    log.info(
        "%s: balanced accuracy %.4f (95%% CI %.3f-%.3f over lesions; no prior correction %.4f, plain %.4f), "
        "accuracy %.4f, macro AUC %.4f, ECE %.4f (uncalibrated %.4f) (%d images)",
        name,
        metrics["balanced_accuracy"],
        metrics["balanced_accuracy_ci_low"],
        metrics["balanced_accuracy_ci_high"],
        metrics["balanced_accuracy_no_correction"],
        metrics["balanced_accuracy_no_tta_no_correction"],
        metrics["accuracy"],
        metrics["macro_roc_auc"],
        metrics["ece"],
        metrics["ece_uncalibrated"],
        len(labels),
    )
    return {f"{name}/{k}": v for k, v in metrics.items()} | {f"{name}/images": len(labels)}


def write_explanations(
    classifier: Classifier, split: SplitData, labels: np.ndarray, probs: np.ndarray, reports: Path, name: str
) -> None:
    """A gallery of explanation maps (DEFAULT_METHOD, of the served prediction): per class the most confident right
    and wrong prediction, with the true and predicted class and the served probability on each tile (skipped, with a
    warning, for a model that is no ViT)."""
    picks = gallery_picks(labels, probs)
    images = np.stack([split.dataset[i][0].numpy() for i, _ in picks])
    try:
        maps = explain_map(classifier, images, classes=probs[[i for i, _ in picks]].argmax(axis=1))
    except ExplainError as err:
        log.warning("no explanation gallery: %s", err)
        return
    ids = split.frame["image_id"].to_numpy()
    titles = [
        f"{kind}: {CLASSES[labels[i]]} as {CLASSES[probs[i].argmax()]} {probs[i].max():.2f}\n{ids[i]}"
        for i, kind in picks
    ]
    suffix = "" if name == "test" else f"_{name}"
    title = f"{name}: {METHODS[DEFAULT_METHOD]}, per class the most confident right and wrong prediction"
    explanation_gallery_png(images, maps, titles, reports / f"explanations{suffix}.png", title)


def write_calibration_reports(
    labels: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray, eces: dict, reports: Path, name: str
) -> None:
    """The reliability diagram's bins as CSV (DVC plots) and as a PNG, before and after the temperature."""
    suffix = "" if name == "test" else f"_{name}"
    tables = {"uncalibrated": reliability(uncalibrated, labels), "calibrated": reliability(calibrated, labels)}
    frame = pd.concat([t.assign(probabilities=k) for k, t in tables.items()], ignore_index=True)
    write_text(reports / f"calibration{suffix}.csv", frame.to_csv(index=False))
    reliability_png(tables, eces, reports / f"reliability{suffix}.png", f"{name}: reliability ({len(labels)} images)")


def write_split_reports(
    frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, metrics: dict, reports: Path, name: str
) -> None:
    """Predictions, confusion and ROC CSVs (DVC plots) and their PNGs for one split."""
    suffix = "" if name == "test" else f"_{name}"
    preds = predictions_frame(frame, probs)
    write_text(reports / f"predictions{suffix}.csv", preds.to_csv(index=False))
    write_text(reports / f"confusions{suffix}.csv", top_confusions(preds).to_csv(index=False))
    write_text(
        reports / f"confusion{suffix}.csv",
        preds.rename(columns={"dx": "actual"})[["actual", "predicted"]].to_csv(index=False),
    )
    curves = roc_curves(labels, probs)
    roc = pd.concat([pd.DataFrame({"class": c, "fpr": f, "tpr": t}) for c, (f, t) in curves.items()])
    write_text(reports / f"roc{suffix}.csv", roc.to_csv(index=False))
    confusion_png(confusion(labels, probs), reports / f"confusion_matrix{suffix}.png", f"{name}: confusion")
    aucs = {c: metrics[f"roc_auc_{c}"] for c in CLASSES}
    roc_png(curves, aucs, reports / f"roc_curves{suffix}.png", f"{name}: ROC (one vs rest)")


def example_images(params: Params, image_size: int, n: int = 2) -> np.ndarray:
    """Real test images for the MLflow signature and input example (pt2 export needs a batch >= 2)."""
    split = load_split(params.paths, "test")
    return np.stack([split.dataset[i][0].numpy() for i in range(min(n, len(split.dataset)))])


def score_registered(model_uri: str, params: Params, metric: str) -> float | None:
    """A registered model's `val_served/...` or `test/...` metric on today's val or test split: its own decision
    rule, images decoded from data/raw at its own size. None for a metric that this cannot recompute."""
    prefix = next((p for p in RESCORED_SPLITS if metric.startswith(p)), None)
    if prefix is None:
        return None
    name = RESCORED_SPLITS[prefix]
    split = load_split(params.paths, name)
    model, size = load_from_mlflow(model_uri, tracking.tracking_uri(params.tracking))
    files = [image_path(params.paths.raw, image_id) for image_id in split.frame["image_id"]]
    _, probs, failures = probabilities(model, files, size, params.evaluate.batch_size)  # an export: on the CPU
    if failures:
        raise DataError(
            f"scoring {model_uri} on the {name} split: {len(failures)} unreadable images, e.g. {failures[0]}"
        )
    score = full_metrics(split.frame["label"].to_numpy(), probs).get(metric.removeprefix(prefix))
    log.info("%s on today's %s split (%d images at %d px): %s %s", model_uri, name, len(files), size, metric, score)
    return score


def trained_checkpoint(models: Path) -> Path:
    """The weights training kept; a run stopped before its end has none yet, and is told how to finish it."""
    best, last = models / CHECKPOINT_FILE, models / RESUME_DIR / LAST_FILE
    if not best.exists() and last.exists():
        raise CheckpointError(
            f"{best}: training has not finished; `python -m src.train` (or `dvc repro`) resumes it from {last}"
        )
    return best


def evaluate(params: Params) -> dict[str, float]:
    """The evaluate stage: fit the decision on val, score it on test, log the served model and register it."""
    device = select_device(params.train.device)
    classifier, ckpt = load_trained(trained_checkpoint(params.paths.models))
    image_size = ckpt["config"]["data"]["image_size"]
    classifier = classifier.to(device)
    splits = ["test"] + ([ISIC_SPLIT] if (params.paths.splits / f"{ISIC_SPLIT}.csv").exists() else [])
    passes = {name: split_pass(classifier, params, name, image_size, device) for name in ["val", *splits]}
    served, metrics = fit_decision(classifier, params, passes["val"])
    for name in splits:
        metrics |= split_metrics(served, params, name, passes[name])
    features = guard_features(classifier, params, device, passes)
    triage = fit_triage(served, params, features)
    metrics |= triage_report(triage, params, features, list(passes), image_size, device)
    save_decision(params.paths.models, triage, ckpt)
    for name in ("val", "test"):  # the served probabilities just written to reports/predictions*.csv, per subgroup
        metrics |= subgroup_report(params, name)
    for stale in params.paths.reports.glob("shift*.*"):  # a report from an earlier run is not this model's
        stale.unlink()
    if params.evaluate.shift:
        for name in ("val", "test"):
            metrics |= shift_report(served, params, name, device)
    write_json(params.paths.reports / "evaluate.json", {k: (None if np.isnan(v) else v) for k, v in metrics.items()})
    tracking.connect(params.tracking)
    provenance = tracking.provenance(params.paths)
    with tracking.run(run_id=ckpt.get("mlflow_run_id") or None, tags=provenance) as active:
        tracking.log_metrics(metrics)
        for png in sorted(params.paths.reports.glob("*.png")):
            tracking.log_artifact(png, "evaluation")
        for table in ("evaluate.json", "confusions.csv", "calibration.csv"):
            tracking.log_artifact(params.paths.reports / table, "evaluation")
        for name in passes:  # the served predictions with their triage flags, per split
            tracking.log_artifact(predictions_file(params, name), "evaluation")
        for table in ("risk_coverage.csv", "ood.csv"):
            if (params.paths.reports / table).exists():
                tracking.log_artifact(params.paths.reports / table, "evaluation")
        for table in sorted([*params.paths.reports.glob("shift*.csv"), *params.paths.reports.glob("subgroups*.csv")]):
            tracking.log_artifact(table, "evaluation")
        if not params.tracking.log_model:
            log.warning("tracking.log_model is false: the model is neither logged nor registered")
            write_model_card(params, ckpt, metrics, provenance, active.info.run_id, None)
            return metrics
        model_uri = tracking.log_model(triage, example_images(params, image_size), params.paths.models)
        metric = params.evaluate.promote_metric
        rescore = partial(score_registered, params=params, metric=metric)
        result = registry.register(model_uri, active.info.run_id, metrics, provenance, params.tracking, metric, rescore)
        tracking.set_tags(
            {
                "registry.name": result["name"],
                "registry.version": result["version"],
                "registry.champion": result["promoted"],
            }
        )
        card = write_model_card(params, ckpt, metrics, provenance, active.info.run_id, result)
        registry.describe(result["name"], result["version"], card, f"{CARD_FILE} in MLflow run {active.info.run_id}")
    return metrics
