"""PNG figures of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.config import CLASSES  # noqa: E402
from src.fileio import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)


def confusion_png(matrix: np.ndarray, path: Path, title: str) -> None:
    """Row-normalised confusion matrix (recall on the diagonal) with raw counts in each cell."""
    fig, ax = plt.subplots(figsize=(6, 5))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{n}\n{rates[i, j]:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if rates[i, j] > 0.5 else "black",
        )
    ax.set(
        xticks=range(len(CLASSES)),
        yticks=range(len(CLASSES)),
        xticklabels=CLASSES,
        yticklabels=CLASSES,
        xlabel="predicted",
        ylabel="actual",
        title=title,
    )
    _save(fig, path)


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], aucs: dict[str, float], path: Path, title: str) -> None:
    """One-vs-rest ROC curve per class, AUC in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs.get(name, float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def reliability_png(tables: dict, eces: dict[str, float], path: Path, title: str) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per set of
    probabilities (before and after the temperature); the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for name, table in tables.items():
        ax.plot(table["confidence"], table["accuracy"], "o-", ms=3, label=f"{name} (ECE {eces[name]:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def explanation_gallery_png(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path, title: str) -> None:
    """Tiles of images with their attention maps laid over them, two per class (most confident right, wrong)."""
    columns = 4
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, tile in zip(axes.flat, images, maps, titles, strict=False):
        _overlay(ax, image, heat, tile)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def explanation_png(image: np.ndarray, heat: np.ndarray, title: str, path: Path) -> None:
    """One image with its attention map laid over it."""
    fig, ax = plt.subplots(figsize=(3, 3.2))
    _overlay(ax, image, heat, title)
    _save(fig, path)


def shift_png(table, path: Path, title: str) -> None:
    """Balanced accuracy per shift, one bar per severity (darker: stronger), the clean score as a line."""
    shifted = table[table["severity"] > 0]
    names = list(dict.fromkeys(shifted["shift"]))
    levels = int(shifted["severity"].max())
    clean = float(table.loc[table["severity"] == 0, "balanced_accuracy"].iloc[0])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    height = 0.8 / levels
    for row in shifted.itertuples():
        y = names.index(row.shift) + (row.severity - 1 - (levels - 1) / 2) * height
        ax.barh(y, row.balanced_accuracy, height=height, color=plt.cm.Blues(0.35 + 0.6 * row.severity / levels))
    ax.axvline(clean, color="k", lw=1, ls="--", label=f"clean {clean:.3f}")
    score = shifted["balanced_accuracy"].mean()
    ax.axvline(score, color="tab:red", lw=1, label=f"shift score {score:.3f}")
    ax.set(
        yticks=range(len(names)),
        yticklabels=names,
        xlim=(0, 1),
        xlabel="balanced accuracy (darker: a stronger shift)",
        title=title,
    )
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def subgroups_png(table, path: Path, title: str) -> None:
    """Forest plot: balanced accuracy and its 95% interval per subgroup (red: wholly below overall, grey: too small),
    the overall score as a line."""
    rows = table[table["grouping"] != "overall"].reset_index(drop=True)
    overall = float(table.loc[table["grouping"] == "overall", "balanced_accuracy"].iloc[0])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.4))
    colours = {"below": "tab:red", "too small": "0.6"}
    for y, row in rows.iterrows():
        colour = colours.get(row["flag"], "tab:blue")
        low, high = row["ci_low"], row["ci_high"]
        if np.isfinite(low) and np.isfinite(high):
            ax.plot([low, high], [y, y], color=colour, lw=1.5)
        ax.plot(row["balanced_accuracy"], y, "o", color=colour, ms=4)
    starts = rows.index[rows["grouping"] != rows["grouping"].shift()]
    for y in starts[1:]:  # a rule between groupings
        ax.axhline(y - 0.5, color="0.85", lw=0.8)
    ax.axvline(overall, color="k", lw=1, ls="--", label=f"overall {overall:.3f}")
    for flag, colour in colours.items():  # a legend entry for each flag the plot shows
        if (rows["flag"] == flag).any():
            ax.plot([], [], "o-", color=colour, ms=4, label=flag)
    labels = [f"{r.grouping}: {r.subgroup} ({r.lesions} lesions)" for r in rows.itertuples()]
    ax.set(yticks=range(len(rows)), yticklabels=labels, xlim=(0, 1), xlabel="balanced accuracy", title=title)
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def risk_coverage_png(curve, metrics: dict[str, float], target: float | None, path: Path) -> None:
    """Balanced accuracy of the decided cases against the share decided, per split, with the referral rule's point
    on each and the target as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, rows), colour in zip(
        curve.groupby("split", sort=False), ("tab:blue", "tab:red", "tab:green"), strict=False
    ):
        ax.plot(rows["coverage"], rows["balanced_accuracy"], color=colour, lw=1.2, label=name)
        if f"referral/{name}/coverage" in metrics:
            point = (metrics[f"referral/{name}/coverage"], metrics[f"referral/{name}/decided_balanced_accuracy"])
            ax.plot(*point, "o", color=colour, label=f"{name} at the threshold: {point[0]:.0%} decided, {point[1]:.3f}")
    if target is not None:
        ax.axhline(target, color="k", lw=1, ls="--", label=f"target {target:.2f} (fitted on val)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="share of cases decided (coverage)", ylabel="balanced accuracy of those")
    ax.set_title("referral: risk-coverage")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
