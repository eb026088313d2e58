"""How faithful an explanation map is: deletion and insertion curves (Samek et al. 2017; Petsiuk et al. 2018, RISE).

A faithful map ranks first the patches that the prediction needs. Deletion replaces the cells of the patch grid by
a blurred copy of the image, the map's most important cell first, in `steps` equal steps, and records the
probability of the class the model predicted on the clean image: the faster it falls (the lower the area under the
curve), the more faithful the map. Insertion starts from the blurred image and puts the clean cells back in the same
order: the faster it rises (the higher the area), the more faithful. A blur rather than black or a mean colour keeps
the images close to those the model was trained on (Petsiuk et al.); at half a cell's width it erases the detail
within a cell and keeps the colour.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from src.learn.explain import METHODS, check_explainable, explain_map
from src.learn.model import Probabilities

log = logging.getLogger(__name__)
REFERENCES = ("random", "centre")  # maps that know nothing of the model or the image: what a method must beat


@dataclass(frozen=True)
class Curves:
    classes: np.ndarray  # (N,) the class the model predicts on the clean image
    deletion: np.ndarray  # (N, steps + 1) its probability as the most important cells are blurred, clean first
    insertion: np.ndarray  # (N, steps + 1) its probability as they return to the blurred image, blurred first


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 NHWC images under a Gaussian blur of `sigma` pixels (edges reflected)."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * (x.shape[-1] // 2) - 1)  # reflection needs less than the side
    out = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cell_order(maps: np.ndarray, grid: int) -> np.ndarray:
    """(N, grid * grid) cell indices (row-major), the highest mean of the map first; ties in index order."""
    cells = F.adaptive_avg_pool2d(torch.from_numpy(np.array(maps, dtype=np.float32))[:, None], grid)
    return np.argsort(-cells.flatten(1).numpy(), axis=1, kind="stable")


def composite(source: np.ndarray, rest: np.ndarray, order: np.ndarray, count: int, grid: int) -> np.ndarray:
    """Images whose first `count` cells in `order` come from `source` and every other cell from `rest`."""
    chosen = np.zeros(order.shape, dtype=bool)
    np.put_along_axis(chosen, order[:, :count], True, axis=1)
    chosen = chosen.reshape(-1, grid, grid)
    rows = np.arange(source.shape[1]) * grid // source.shape[1]  # the cell row (and column) of each pixel
    mask = chosen[:, rows][:, :, rows][..., None]
    return np.where(mask, source, rest)


@torch.inference_mode()
def class_probabilities(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, classes) probabilities of a model that takes uint8 NHWC images and returns probabilities."""
    return np.concatenate(
        [
            model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).float().numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def faithfulness_curves(
    model: torch.nn.Module,
    images: np.ndarray,
    maps: np.ndarray,
    grid: int,
    steps: int = 16,
    sigma: float | None = None,
    batch_size: int = 64,
) -> Curves:
    """Deletion and insertion curves of each image's map over a grid x grid partition of the image, in `steps` steps
    (sigma: the blur in pixels; default half a cell)."""
    size = images.shape[1]
    base = blurred(images, size / grid / 2 if sigma is None else sigma)
    clean = class_probabilities(model, images, batch_size)
    classes = clean.argmax(axis=1)
    rows = np.arange(len(images))

    def probability(batch: np.ndarray) -> np.ndarray:
        return class_probabilities(model, batch, batch_size)[rows, classes]

    order = cell_order(maps, grid)
    counts = np.rint(np.linspace(0, grid * grid, steps + 1)).astype(int)
    ends = probability(images), probability(base)
    deletion, insertion = [ends[0]], [ends[1]]
    for count in counts[1:-1]:
        deletion.append(probability(composite(base, images, order, count, grid)))
        insertion.append(probability(composite(images, base, order, count, grid)))
    deletion.append(ends[1])
    insertion.append(ends[0])
    return Curves(classes, np.stack(deletion, axis=1), np.stack(insertion, axis=1))


def area(curves: np.ndarray) -> np.ndarray:
    """Per curve (row), the area under it over the fraction of cells changed, 0 to 1 (trapezoids)."""
    return (curves[:, :-1] + curves[:, 1:]).sum(axis=1) / (2 * (curves.shape[1] - 1))


def reference_maps(name: str, n: int, size: int, seed: int = 0) -> np.ndarray:
    """`random`: noise, a different order per image; `centre`: a Gaussian bump in the middle, where dermoscopy puts
    the lesion."""
    if name == "random":
        return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)
    if name == "centre":
        axis = (np.arange(size) + 0.5 - size / 2) / (size / 4)
        bump = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / 2).astype(np.float32)
        return np.broadcast_to(bump, (n, size, size))
    raise ValueError(f"unknown reference map {name!r}; expected one of {REFERENCES}")


def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of `n` images (sorted), the classes as equal in number as the split allows, drawn at random."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
    picks = [pool[rank] for rank in range(max(map(len, pools), default=0)) for pool in pools if rank < len(pool)]
    return np.sort(np.asarray(picks[:n], dtype=np.int64))


def faithfulness_table(
    served: Probabilities, images: np.ndarray, methods: list[str], steps: int = 16, batch_size: int = 32
) -> pd.DataFrame:
    """Per explanation method (and reference map): mean deletion and insertion AUC over the images with their
    standard errors. The probabilities are the served decision's (temperature, offsets) on one view per image: the
    maps explain that view, and TTA's eight views would cost eight times as much."""
    classifier = check_explainable(served)
    model = Probabilities(classifier, False, served.offsets, float(served.temperature)).eval()
    grid = int(classifier.backbone.patch_embed.grid_size[0])
    classes = class_probabilities(model, images, batch_size).argmax(axis=1)
    rows = []
    for name in [*methods, *REFERENCES]:
        start = time.perf_counter()
        if name in REFERENCES:
            maps = reference_maps(name, len(images), images.shape[1])
        else:
            maps = np.concatenate(
                [
                    explain_map(classifier, images[i : i + batch_size], name, classes[i : i + batch_size])
                    for i in range(0, len(images), batch_size)
                ]
            )
        curves = faithfulness_curves(model, images, maps, grid, steps, batch_size=batch_size)
        rows.append(_row(name, curves, steps))
        log.info("%s: %.1f s", name, time.perf_counter() - start)
    return pd.DataFrame(rows)


def _row(name: str, curves: Curves, steps: int) -> dict:
    deletion, insertion = area(curves.deletion), area(curves.insertion)
    n = len(deletion)
    return {
        "method": name,
        "kind": "reference" if name in REFERENCES else "map",
        "deletion_auc": deletion.mean(),
        "deletion_se": deletion.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan"),
        "insertion_auc": insertion.mean(),
        "insertion_se": insertion.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan"),
        "insertion_minus_deletion": (insertion - deletion).mean(),
        "images": n,
        "steps": steps,
    }


def most_faithful(table: pd.DataFrame) -> tuple[str, bool]:
    """The map method with the lowest deletion and the highest insertion AUC, and True; where no method has both,
    the one with the highest insertion minus deletion, and False."""
    maps = table[table["kind"] == "map"]
    lowest = maps.loc[maps["deletion_auc"].idxmin(), "method"]
    highest = maps.loc[maps["insertion_auc"].idxmax(), "method"]
    if lowest == highest:
        return str(lowest), True
    return str(maps.loc[maps["insertion_minus_deletion"].idxmax(), "method"]), False


def format_table(table: pd.DataFrame) -> str:
    """The table as a reader sees it: AUCs with their standard errors, and which method is the most faithful."""
    lines = [f"{'method':<18} {'deletion AUC (lower better)':>28} {'insertion AUC (higher better)':>30} {'images':>7}"]
    for row in table.itertuples():
        name = row.method if row.kind == "map" else f"{row.method} (ref.)"
        deletion = f"{row.deletion_auc:.4f} +- {row.deletion_se:.4f}"
        insertion = f"{row.insertion_auc:.4f} +- {row.insertion_se:.4f}"
        lines.append(f"{name:<18} {deletion:>28} {insertion:>30} {row.images:>7}")
    best, agree = most_faithful(table)
    rule = "lowest deletion and highest insertion" if agree else "they disagree: highest insertion minus deletion"
    lines.append(f"most faithful: {best} ({rule}; {METHODS[best]})")
    return "\n".join(lines)
