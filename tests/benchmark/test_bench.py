"""The speed benchmark on a tiny configuration, and the batched colour jitter it led to (src.learn.data)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src import bench
from src.benchmark.inputs import find_image_files, read_labels
from src.benchmark.options import BenchOptions
from src.benchmark.timing import loader_rate
from src.config import AugmentParams
from src.learn import data
from src.learn.data import CachedImages, train_transform

REPO = Path(__file__).resolve().parents[2]
FIGURES = (
    "ceiling_gflops",
    "model_only_images_per_s",
    "train_step_gflop",
    "model_only_gflops",
    "model_only_ratio_to_ceiling",
    "real_path_images_per_s",
    "real_path_ratio_to_model_only",
    "naive_images_per_s",
    "speedup_over_naive",
    "inference_images_per_s",
    "inference_single_latency_ms",
    "train_peak_rss_mb",
    "inference_peak_rss_mb",
    "cache_build_images_per_s",
    "baseline_rss_mb",
    "real_loader_images_per_s",
    "naive_loader_images_per_s",
    "loader_speedup_over_naive",
)


def test_bench_writes_every_figure_in_each_precision(tmp_path, capsys):
    output = tmp_path / "out" / "bench.json"
    argv = [
        "--params",
        str(REPO / "params.yaml"),
        "-S",
        "model.name=test_vit",
        "-S",
        "model.pretrained=false",
        "-S",
        "data.image_size=32",
        "-S",
        "train.batch_size=8",
        "-S",
        "train.threads=2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--max-images",
        "40",
        "--output",
        str(output),
        "--precision",  # both, forced: bf16 runs emulated where the CPU has no bf16 units
        "fp32",
        "--precision",
        "bf16",
    ]
    assert bench.main(argv) == 0
    result = json.loads(output.read_text())
    assert set(result["precisions"]) == {"fp32", "bf16"}
    for precision, figures in result["precisions"].items():
        for key in FIGURES:
            top = key in ("cache_build_images_per_s", "baseline_rss_mb")  # once per process, not per precision
            value = result[key] if top else figures[key]
            assert isinstance(value, float) and value > 0, (precision, key)
    config = result["config"]
    assert config["precisions"] == ["fp32", "bf16"]
    assert config["model"] == "test_vit" and config["image_size"] == 32 and config["batch_size"] == 8
    assert config["device"] == "cpu" and config["workers"] == 0 and config["torch"] == torch.__version__
    assert config["n_images"] == 40 and config["images"] == "synthetic"
    printed = capsys.readouterr().out
    assert "real path" in printed and str(output) in printed
    assert "in fp32" in printed and "in bf16" in printed and "bf16 over fp32: ceiling" in printed
    assert not list(output.parent.glob(".*.tmp"))  # written atomically


@pytest.mark.parametrize("nested", [True, False])
def test_image_folder_with_or_without_images_subfolder(tmp_path, nested):
    folder = tmp_path / "ham"
    images = folder / "images" if nested else folder
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 100, 50)).save(images / f"ISIC_{i:07d}.jpg")
    metadata = "lesion_id,image_id,dx\nHAM_1,ISIC_0000000,mel\nHAM_2,ISIC_0000001,nv\n"
    (folder / "HAM10000_metadata.csv").write_text(metadata)
    files = find_image_files(folder)
    assert [f.name for f in files] == [f"ISIC_{i:07d}.jpg" for i in range(3)]
    labels = read_labels(folder, files)
    assert labels[:2].tolist() == [4, 5] and 0 <= labels[2] < 7  # mel, nv; the unlisted one gets a random class


@pytest.mark.parametrize(
    "aug",
    [
        AugmentParams(hue=0.2),
        AugmentParams(flips=False, rot90=False),
        AugmentParams(rot90=False, hue=0, brightness=0),
        AugmentParams(policy="trivial", random_erasing=0.5),
        AugmentParams(policy="randaugment"),
        AugmentParams(color_cast=0.3, gamma=0.3, blur=0.5, noise=0.5, jpeg=0.5, hair=0.5),  # the acquisition shifts
    ],
)
def test_batched_augmentation_matches_per_sample_transform(tmp_path, aug):
    """CachedImages.__getitems__ (what the loader calls) = per-sample __getitem__, same RNG draws, rounding aside."""
    size = 24
    cache = tmp_path / "images.npy"
    np.save(cache, np.random.default_rng(0).integers(0, 256, (20, size, size, 3), dtype=np.uint8))
    dataset = CachedImages(cache, np.arange(20), np.arange(20) % 7, train_transform(aug, size))
    indices = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    torch.manual_seed(0)
    expected = [dataset[i] for i in indices]
    after_expected = torch.rand(3)
    torch.manual_seed(0)
    batched = dataset.__getitems__(indices)
    assert torch.equal(torch.rand(3), after_expected)  # the same random draws
    assert [y for _, y in batched] == [y for _, y in expected]
    got = torch.stack([x for x, _ in batched]).int()
    want = torch.stack([x for x, _ in expected]).int()
    assert got.shape == want.shape == (len(indices), size, size, 3)
    diff = (got - want).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 1e-3


def test_colour_jitter_in_slices_gives_the_pixels_of_the_whole_batch(tmp_path, monkeypatch):
    size, indices = 24, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    cache = tmp_path / "images.npy"
    np.save(cache, np.random.default_rng(0).integers(0, 256, (10, size, size, 3), dtype=np.uint8))
    dataset = CachedImages(cache, np.arange(10), np.zeros(10), train_transform(AugmentParams(hue=0.2), size))
    torch.manual_seed(0)
    whole = dataset.__getitems__(indices)
    monkeypatch.setattr(data, "JITTER_SLICE_BYTES", 4 * 3 * size * size * 5)  # slices of 5 images: 5, 5, 2
    torch.manual_seed(0)
    sliced = dataset.__getitems__(indices)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(whole, sliced, strict=True))


def test_getitems_without_jitter_is_per_sample(tmp_path):
    cache = tmp_path / "images.npy"
    np.save(cache, np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    plain = CachedImages(cache, np.arange(5), np.zeros(5))
    assert all(
        torch.equal(a, b[0]) for a, b in zip([plain[i][0] for i in (4, 0)], plain.__getitems__([4, 0]), strict=True)
    )
    aug = AugmentParams(brightness=0, contrast=0, saturation=0, hue=0)
    geometric = CachedImages(cache, np.arange(5), np.zeros(5), train_transform(aug, 16))
    torch.manual_seed(0)
    expected = [geometric[i][0] for i in (4, 0)]
    torch.manual_seed(0)
    assert all(torch.equal(a, b[0]) for a, b in zip(expected, geometric.__getitems__([4, 0]), strict=True))


class _TenMsPerImage(torch.utils.data.Dataset):
    """Each image takes at least 10 ms to make: 4 workers cannot feed more than 400 images/s."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.zeros(3), 0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 sleeping workers on 2 cores are fine
def test_loader_rate_with_workers_is_not_the_queue_speed():
    loader = torch.utils.data.DataLoader(_TenMsPerImage(), batch_size=2, num_workers=4, persistent_workers=True)
    # 3 chunks of 16 batches: only the first can start with a round of batches ready, and the median is another
    rate = loader_rate(loader, BenchOptions(steps=12, warmup=2, chunks=3))
    # batches arrive 4 at a time; timing them one by one read the queue's speed, over 1,000 images/s here
    assert rate <= 400 * 1.1
