"""Classifying image files: a big folder is streamed in batches, with bad files reported and skipped."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import torch
from PIL import Image

from src.config import ModelParams
from src.learn.inference import predict_files
from src.learn.model import Probabilities, build_model

FILES = 10_000
SIZE = 32


def test_a_folder_of_10000_files_is_streamed_with_flat_memory(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(FILES):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / f"ISIC_{k:07d}.png")
    (folder / "ISIC_empty.png").write_bytes(b"")  # among them, an empty file and a text file with an image name
    (folder / "ISIC_text.png").write_text("not an image")
    torch.manual_seed(0)
    model = Probabilities(build_model(ModelParams(name="test_vit", pretrained=False), SIZE)).eval()

    tracemalloc.start()
    failed = predict_files([folder], tmp_path / "submission.csv", model, SIZE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert failed == 2
    frame = pd.read_csv(tmp_path / "submission.csv")
    assert len(frame) == FILES and frame["image"].is_unique
    np.testing.assert_allclose(frame.drop(columns="image").sum(axis=1), 1, atol=1e-4)
    # decoding all 10,000 at once would hold FILES * SIZE * SIZE * 3 bytes of pixels (31 MB); batches hold 64
    all_pixels = FILES * SIZE * SIZE * 3
    assert peak < all_pixels / 3, f"peak traced memory {peak / 2**20:.1f} MiB"
