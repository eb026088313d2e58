"""A model card per evaluated run (Mitchell et al. 2019, "Model Cards for Model Reporting"): what the model is, what
it is for and not for, its data, metrics with intervals, calibration, subgroups, robustness, decision rule and
known limitations, in Markdown, from the run's checkpoint, metrics, provenance and reports."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from src.config import CLASSES, Params
from src.fileio import read_json, write_text
from src.learn.inference import DECISION_FILE
from src.prepare.index import ISIC_SPLIT, SPLITS, read_split
from src.tracking import runs as tracking
from src.tracking.triage_report import guard_misses_probes

log = logging.getLogger(__name__)
CARD_FILE = "model_card.md"
RARE = ("df", "vasc")  # HAM10000's two smallest classes: their test recall rests on a few dozen lesions
SHIFT_KEYS = ("clean", "score", "drop", "worst")


@dataclass(frozen=True)
class RunFacts:
    """Everything a card says, gathered from one evaluated run."""

    config: dict  # the checkpoint's config: the model, train and data settings the weights were made with
    best_epoch: int
    metrics: dict[str, float]
    provenance: dict[str, str]
    decision: dict
    splits: dict[str, pd.DataFrame]
    subgroups: pd.DataFrame | None  # test's subgroup table, None where evaluate wrote none
    run_id: str
    registered: dict | None  # registry name, version and promoted; None where the model was not registered


def number(value, digits: int = 4) -> str:
    """A metric as the card prints it; "n/a" where it is missing or undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def with_interval(metrics: dict, prefix: str) -> str:
    """Balanced accuracy under `prefix` with its lesion-bootstrap interval."""
    get = metrics.get
    ba = f"{prefix}balanced_accuracy"
    return f"{number(get(ba))} (95% CI {number(get(f'{ba}_ci_low'))}-{number(get(f'{ba}_ci_high'))})"


def setting(value) -> str:
    """A training setting as the card prints it: "off" for None and zero."""
    return "off" if value is None or value == 0 else str(value)


def details(facts: RunFacts) -> str:
    model, train, data = facts.config["model"], facts.config["train"], facts.config["data"]
    if model.get("weights"):
        origin = f"initialised from the local weights file `{model['weights']}`"
    elif model.get("pretrained"):
        origin = f"initialised from timm's pretrained `{model['name']}` weights (ImageNet, from the Hugging Face hub)"
    else:
        origin = "trained from scratch (random initialisation)"
    commit, prov = facts.provenance.get("git.commit", "unknown"), facts.provenance
    dirty = " (the tree had uncommitted changes: the commit alone does not reproduce it)"
    registered = facts.registered
    lines = [
        "## Model details",
        f"- Architecture: timm `{model['name']}` at {data['image_size']} px, a classifier of dermoscopy images into "
        f"{len(CLASSES)} classes ({', '.join(CLASSES)}); dropout {model['dropout']}, drop path {model['drop_path']}.",
        f"- Weights: {origin}.",
        f"- Training: {train['epochs']} epochs (epoch {facts.best_epoch} kept), batch {train['batch_size']}, "
        f"lr {train['lr']}, weight decay {train['weight_decay']}, layer decay {setting(train['layer_decay'])}, "
        f"label smoothing {train['label_smoothing']}, sampler {train['sampler']}, class weights "
        f"{train['class_weights']}, mixup {setting(train['mixup'])}, cutmix {setting(train['cutmix'])}, "
        f"EMA {setting(train['ema_decay'])}, "
        f"colour constancy (Shades of Gray power) {setting(data.get('shades_of_gray_power'))}, seed {train['seed']}.",
        f"- Code: git commit `{commit}`{dirty if prov.get('git.dirty') == 'true' else ''}.",
        f"- Data: source `{prov.get('data.source', 'unknown')}`, split hash `{prov.get('data.split_hash', 'unknown')}`,"
        f" DVC split md5 `{prov.get('data.dvc_split_md5', 'unknown')}`.",
        f"- Reproduce: `git checkout {commit} && dvc repro`, or `python -m src.train && python -m src.evaluate` "
        "with that commit's params.yaml.",
        f"- MLflow run `{facts.run_id}`"
        + (
            f"; registered as `{registered['name']}` version {registered['version']}"
            f"{' (champion)' if registered.get('promoted') else ''}."
            if registered
            else "; not registered (tracking.log_model is false)."
        ),
    ]
    return "\n".join(lines)


INTENDED_USE = """## Intended use
- Research on dermoscopy images of pigmented skin lesions: comparing models, training settings and decision rules
  on HAM10000-like data, and teaching how such a classifier is built and evaluated.
- Not a medical device. Not for diagnosis, triage or screening of any patient, nor as a second opinion.
- Not for clinical (non-dermoscopic) photographs, phone pictures, histology or any other kind of image, nor for
  lesions outside its seven classes: it assigns every image to one of them."""


def data_section(facts: RunFacts) -> str:
    header = "| split | images | lesions | " + " | ".join(CLASSES) + " |"
    rows = [header, "|" + "---|" * (3 + len(CLASSES))]
    for name, frame in facts.splits.items():
        counts = frame["dx"].value_counts()
        per_class = " | ".join(str(int(counts.get(c, 0))) for c in CLASSES)
        rows.append(f"| {name} | {len(frame)} | {frame['lesion_id'].nunique()} | {per_class} |")
    return "\n".join(
        [
            "## Training and evaluation data",
            "Lesion-grouped splits (no lesion in two splits; near-duplicate photos kept together). Val chooses the "
            "epoch and fits the decision rule; test is scored once with it.",
            "",
            *rows,
        ]
    )


def metric_columns(m: dict) -> list[tuple[str, str]]:
    """The card's metric columns (heading, metric prefix): val and test, and the ISIC 2018 test set where evaluate
    scored one (images from other clinics and devices than HAM10000's)."""
    columns = [("val (served)", "val_served/"), ("test", "test/")]
    return columns + ([("ISIC 2018 test", f"{ISIC_SPLIT}/")] if f"{ISIC_SPLIT}/balanced_accuracy" in m else [])


def metrics_section(facts: RunFacts) -> str:
    m, columns = facts.metrics, metric_columns(facts.metrics)
    rows = [
        ("balanced accuracy", *(with_interval(m, prefix) for _, prefix in columns)),
        ("macro ROC AUC", *(number(m.get(f"{prefix}macro_roc_auc")) for _, prefix in columns)),
        *(
            (f"melanoma {k}", *(number(m.get(f"{prefix}melanoma_{k}")) for _, prefix in columns))
            for k in ("sensitivity", "specificity")
        ),
    ]
    return "\n".join(
        [
            "## Metrics",
            "The served model (its decision rule below). Intervals: percentile bootstrap over lesions, 2000 resamples."
            " Val's prior correction, where on, is fitted on the other half of val's lesions.",
            "",
            "| metric | " + " | ".join(heading for heading, _ in columns) + " |",
            "|---" * (1 + len(columns)) + "|",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    )


def calibration_section(facts: RunFacts) -> str:
    m = facts.metrics
    return "\n".join(
        [
            "## Calibration",
            f"- Temperature: {number(m.get('decision/temperature'), 3)} served "
            f"(fitted on val by NLL: {number(m.get('decision/temperature_fitted'), 3)}).",
            f"- Expected calibration error, val: {number(m.get('decision/val_ece_uncalibrated'))} uncalibrated, "
            f"{number(m.get('decision/val_ece'))} with the temperature; test: "
            f"{number(m.get('test/ece_uncalibrated'))} uncalibrated, {number(m.get('test/ece'))} served "
            "(temperature and any prior-correction offsets).",
        ]
    )


def decision_section(facts: RunFacts) -> str:
    rule = facts.decision
    tta = f"yes, {rule.get('tta_views', 8)} views" if rule.get("tta") else "no"
    offsets = rule.get("offsets")
    shown = (
        "none"
        if not offsets or not any(offsets)
        else ", ".join(f"{c} {v:+.3f}" for c, v in zip(CLASSES, offsets, strict=True))
    )
    return "\n".join(
        [
            f"## Decision rule (`models/{DECISION_FILE}`)",
            f"- Test-time augmentation (mean over flips and 90-degree rotations): {tta}.",
            f"- Temperature: {number(rule.get('temperature'), 3)}.",
            f"- Prior-correction logit offsets: {shown}.",
            "- The predicted class is the argmax of the resulting probabilities.",
            referral_line(facts.metrics, rule.get("referral_threshold")),
            guard_line(facts.metrics),
        ]
    )


def referral_line(m: dict, threshold: float | None) -> str:
    """The referral rule and what it decides on val and test."""
    if "referral/val/coverage" not in m:
        return "- Referral: none (`evaluate.referral_target` is null); every case is decided."
    if m["referral/val/coverage"] == 0:  # the threshold is above every probability (REFER_ALL)
        return (
            f"- Referral: no confidence threshold reaches the target balanced accuracy "
            f"{number(m.get('referral/target'), 2)} on val, so every case is referred: this model decides nothing."
        )
    return (
        f"- Referral: a case is referred when its top probability is below {number(threshold, 4)} (fitted on val for "
        f"decided cases' balanced accuracy {number(m.get('referral/target'), 2)}); decided on val "
        f"{100 * m['referral/val/coverage']:.1f}% at {number(m['referral/val/decided_balanced_accuracy'])}, on test "
        f"{100 * m['referral/test/coverage']:.1f}% at {number(m['referral/test/decided_balanced_accuracy'])}"
        + (
            f", on the ISIC 2018 test set {100 * m[isic]:.1f}% at "
            f"{number(m[f'referral/{ISIC_SPLIT}/decided_balanced_accuracy'])}"
            if (isic := f"referral/{ISIC_SPLIT}/coverage") in m
            else ""
        )
        + " (reports/risk_coverage.csv)."
    )


def guard_line(m: dict) -> str:
    """The OOD guard and its rates."""
    if "ood/threshold" not in m:
        return "- Out-of-distribution guard: none (`evaluate.ood_keep` is null)."
    weak = " It lets too many of them through: do not rely on its flag for this model."
    weak = weak if guard_misses_probes(m) else ""
    return (
        f"- Out-of-distribution guard: Mahalanobis distance of the pooled features to the nearest class above "
        f"{number(m['ood/threshold'], 2)} flags the input; it flags {100 * m['ood/val_flagged']:.1f}% of val, "
        f"{100 * m['ood/test_flagged']:.1f}% of test, {100 * m['ood/photos_flagged']:.0f}% of the non-dermoscopy "
        f"photographs and {100 * m['ood/generated_flagged']:.0f}% of the generated screenshots, text and flat colours "
        f"(reports/ood.csv).{weak}"
    )


def subgroup_section(facts: RunFacts) -> str:
    lines = ["## Results by subgroup (test)"]
    table = facts.subgroups
    if table is None:
        return "\n".join([*lines, "Not computed."])
    lines += [
        "Balanced accuracy with its 95% lesion-bootstrap interval; flag: `below` where the interval lies wholly "
        "below the overall score, `too small` under 10 lesions or a single class (reports/subgroups.csv; val's in "
        "subgroups_val.csv).",
        "",
        "| grouping | subgroup | images | lesions | balanced accuracy (95% CI) | mel. sens. | mel. spec. | flag |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        ci = f"{number(r.ci_low, 3)}-{number(r.ci_high, 3)}"
        lines.append(
            f"| {r.grouping} | {r.subgroup} | {r.images} | {r.lesions} | {number(r.balanced_accuracy, 3)} ({ci}) | "
            f"{number(r.melanoma_sensitivity, 3)} | {number(r.melanoma_specificity, 3)} | {r.flag or ''} |"
        )
    return "\n".join(lines)


def robustness_section(facts: RunFacts) -> str:
    shift = {k: facts.metrics.get(f"shift/test/{k}") for k in SHIFT_KEYS}
    if shift["clean"] is None:
        return "## Robustness (acquisition shifts, test)\nNot run (evaluate.shift is false)."
    return "\n".join(
        [
            "## Robustness (acquisition shifts, test)",
            "Balanced accuracy on a fixed lesion-stratified subset of test, one view, under colour, blur, JPEG, zoom, "
            "hair and other shifts at 2-3 severities (reports/shift.csv):",
            f"- clean {number(shift['clean'])}, mean over shifts {number(shift['score'])} "
            f"(drop {number(shift['drop'])}), worst condition {number(shift['worst'])}.",
        ]
    )


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def limitations_section(facts: RunFacts) -> str:
    test = facts.splits.get("test")
    rare = (
        ", ".join(
            f"{c} {plural(int((test['dx'] == c).sum()), 'image')} "
            f"({plural(test.loc[test['dx'] == c, 'lesion_id'].nunique(), 'lesion')})"
            for c in RARE
        )
        if test is not None
        else "unknown"
    )
    return "\n".join(
        [
            "## Known limitations",
            f"- Rare classes: test holds {rare}; their recall, and so balanced accuracy, moves with a handful of "
            "lesions (see the intervals).",
            "- Single-source data: HAM10000 comes from two sites (Medical University of Vienna; a skin cancer "
            "practice in Queensland, Australia), mostly fair-skinned patients and a few dermatoscopes; other "
            "clinics, devices and skin types are untested.",
            "- Attention-rollout maps often highlight the image corners (vignetting, dermatoscope borders) rather than "
            "the lesion; the gradient-weighted maps of the gallery point at the lesion more faithfully (deletion and "
            "insertion, `python -m src.faithfulness`), yet show where the model looked, not why it decided.",
            "- Subgroups with few lesions have wide intervals; an unflagged subgroup is not shown to be as good.",
        ]
    )


def model_card(facts: RunFacts) -> str:
    """The card's Markdown."""
    registered = facts.registered
    title = f"{registered['name']} version {registered['version']}" if registered else f"run {facts.run_id}"
    sections = [
        f"# Model card: {title}\n"
        'After Mitchell et al. 2019, "Model Cards for Model Reporting"; generated by `python -m src.evaluate`.',
        details(facts),
        INTENDED_USE,
        data_section(facts),
        metrics_section(facts),
        calibration_section(facts),
        decision_section(facts),
        subgroup_section(facts),
        robustness_section(facts),
        limitations_section(facts),
    ]
    return "\n\n".join(sections) + "\n"


def read_subgroups(path: Path) -> pd.DataFrame:
    """A subgroup table as written; only empty cells are missing (a subgroup may be called "NA")."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""]).fillna({"flag": ""})


def card_splits(params: Params) -> dict[str, pd.DataFrame]:
    """train, val and test, and the ISIC 2018 test set where the split stage indexed one."""
    isic = (params.paths.splits / f"{ISIC_SPLIT}.csv").exists()
    return {name: read_split(params.paths, name) for name in (*SPLITS, *([ISIC_SPLIT] if isic else []))}


def write_model_card(
    params: Params, ckpt: dict, metrics: dict, provenance: dict, run_id: str, registered: dict | None
) -> str:
    """Gather the run's facts, write reports/model_card.md and log it as the run's artifact; the card's text."""
    reports: Path = params.paths.reports
    subgroups = reports / "subgroups.csv"
    facts = RunFacts(
        config=ckpt["config"],
        best_epoch=int(ckpt.get("epoch", 0)),
        metrics=metrics,
        provenance=provenance,
        decision=read_json(params.paths.models / DECISION_FILE),
        splits=card_splits(params),
        subgroups=read_subgroups(subgroups) if subgroups.exists() else None,
        run_id=run_id,
        registered=registered,
    )
    text = model_card(facts)
    write_text(reports / CARD_FILE, text)
    tracking.log_artifact(reports / CARD_FILE)
    log.info("model card: %s (%d characters)", reports / CARD_FILE, len(text))
    return text
