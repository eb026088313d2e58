"""Deletion and insertion curves: their ends, a map on the informative patch beating one elsewhere, the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import ModelParams
from src.learn.explain import METHODS
from src.learn.faithfulness import (
    REFERENCES,
    area,
    balanced_subset,
    blurred,
    cell_order,
    class_probabilities,
    composite,
    faithfulness_curves,
    faithfulness_table,
    format_table,
    most_faithful,
    reference_maps,
)
from src.learn.model import Probabilities, build_model

GRID, CELL = 4, 8  # a 4x4 grid of 8-px cells on 32-px images
INFORMATIVE = (1, 2)  # the one cell the test model reads


class OneCellModel(torch.nn.Module):
    """Two classes: class 0 as likely as the informative cell is bright, whatever the rest of the image shows."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r, c = INFORMATIVE
        brightness = images[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].float().mean(dim=(1, 2, 3))
        p = torch.sigmoid((brightness - 150) / 10)
        return torch.stack([p, 1 - p], dim=1)


def images_with_a_bright_cell(n: int = 3) -> np.ndarray:
    """Dark noisy images with the informative cell bright: the model is sure of class 0 on them."""
    rng = np.random.default_rng(0)
    images = rng.integers(20, 60, (n, GRID * CELL, GRID * CELL, 3)).astype(np.uint8)
    r, c = INFORMATIVE
    images[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = 220
    return images


def map_on(cell: tuple[int, int], n: int) -> np.ndarray:
    maps = np.zeros((n, GRID * CELL, GRID * CELL), np.float32)
    maps[:, cell[0] * CELL : (cell[0] + 1) * CELL, cell[1] * CELL : (cell[1] + 1) * CELL] = 1
    return maps


def test_curves_have_steps_plus_one_points_from_the_clean_to_the_blurred_image_and_back():
    model, images = OneCellModel(), images_with_a_bright_cell()
    maps = reference_maps("random", len(images), images.shape[1])
    steps = 8
    curves = faithfulness_curves(model, images, maps, GRID, steps)
    assert curves.deletion.shape == curves.insertion.shape == (3, steps + 1)
    assert (curves.classes == 0).all()  # the class predicted on the clean image
    clean = class_probabilities(model, images)[:, 0]
    base = class_probabilities(model, blurred(images, CELL / 2))[:, 0]
    assert clean.min() > 0.99 and base.max() < 0.1  # the blur erases what the model reads
    np.testing.assert_allclose(curves.deletion[:, 0], clean)
    np.testing.assert_allclose(curves.deletion[:, -1], base)  # deletion ends on the fully blurred image
    np.testing.assert_allclose(curves.insertion[:, 0], base)
    np.testing.assert_allclose(curves.insertion[:, -1], clean)
    order = cell_order(maps, GRID)
    base_images = blurred(images, CELL / 2)
    assert np.array_equal(composite(base_images, images, order, 0, GRID), images)
    assert np.array_equal(composite(base_images, images, order, GRID * GRID, GRID), base_images)
    half = composite(base_images, images, order, 8, GRID)
    changed = (half != images).any(axis=(2, 3)).reshape(3, GRID, CELL).any(axis=2)  # per image and cell row
    assert changed.any() and not np.array_equal(half, base_images)


def test_a_map_on_the_informative_cell_is_more_faithful_than_one_elsewhere():
    model, images = OneCellModel(), images_with_a_bright_cell()
    right = faithfulness_curves(model, images, map_on(INFORMATIVE, 3), GRID, steps=16)
    wrong = faithfulness_curves(model, images, 1 - map_on(INFORMATIVE, 3), GRID, steps=16)  # that cell last
    assert (area(right.deletion) < 0.1).all() and (area(wrong.deletion) > 0.9).all()
    assert (area(right.insertion) > 0.9).all() and (area(wrong.insertion) < 0.1).all()
    assert right.deletion[0, 1] < 0.1 and right.insertion[0, 1] > 0.9  # the first step already decides


def test_cells_are_ranked_by_the_maps_mean_and_areas_span_zero_to_one():
    maps = map_on(INFORMATIVE, 2)
    maps[1, :CELL, :CELL] = 2  # the second image's map prefers the top-left cell
    order = cell_order(maps, GRID)
    assert order.shape == (2, GRID * GRID) and order[0, 0] == INFORMATIVE[0] * GRID + INFORMATIVE[1]
    assert order[1, :2].tolist() == [0, INFORMATIVE[0] * GRID + INFORMATIVE[1]]
    assert sorted(order[0]) == list(range(GRID * GRID))
    np.testing.assert_allclose(area(np.array([[0.3] * 5, np.linspace(0, 1, 5)])), [0.3, 0.5])


def test_reference_maps_and_the_balanced_subset():
    assert reference_maps("centre", 2, 32).shape == (2, 32, 32)
    assert sorted(cell_order(reference_maps("centre", 1, 32), GRID)[0, :4]) == [5, 6, 9, 10]  # the middle four
    assert not np.array_equal(*cell_order(reference_maps("random", 2, 32), GRID))
    with pytest.raises(ValueError, match="unknown reference map"):
        reference_maps("middle", 1, 32)
    labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
    picks = balanced_subset(labels, 12)
    assert np.array_equal(picks, balanced_subset(labels, 12)) and np.array_equal(picks, np.sort(picks))
    assert np.bincount(labels[picks]).tolist() == [4, 4, 4]
    assert np.bincount(labels[balanced_subset(labels, 30)]).tolist() == [13, 5, 12]  # the rare class all in
    assert len(balanced_subset(labels, 500)) == len(labels)


def test_the_table_measures_every_method_and_reference_on_a_vit():
    torch.manual_seed(0)
    vit = build_model(ModelParams(name="test_vit", pretrained=False, patch_size=8), 32).eval()
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    table = faithfulness_table(Probabilities(vit), images, list(METHODS), steps=4, batch_size=5)
    assert table["method"].tolist() == [*METHODS, *REFERENCES]
    assert table[["deletion_auc", "insertion_auc"]].stack().between(0, 1).all()
    assert (table["images"] == 5).all() and (table["steps"] == 4).all()
    again = faithfulness_table(Probabilities(vit), images, ["grad_cam"], steps=4, batch_size=2)  # batches agree
    pd.testing.assert_frame_equal(again.iloc[:1], table.iloc[3:4].reset_index(drop=True), atol=1e-6)
    assert "most faithful:" in format_table(table)


def test_the_most_faithful_method_and_when_the_two_curves_disagree():
    table = pd.DataFrame(
        {
            "method": ["a", "b", "random"],
            "kind": ["map", "map", "reference"],
            "deletion_auc": [0.3, 0.2, 0.0],
            "insertion_auc": [0.6, 0.7, 1.0],
        }
    )
    table["insertion_minus_deletion"] = table["insertion_auc"] - table["deletion_auc"]
    assert most_faithful(table) == ("b", True)  # a reference never wins
    table.loc[0, "insertion_auc"] = 0.95  # a rises faster, b falls faster
    table["insertion_minus_deletion"] = table["insertion_auc"] - table["deletion_auc"]
    assert most_faithful(table) == ("a", False)
