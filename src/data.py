"""Dataset over the split stage's decoded cache, train-time augmentation, class-balanced sampling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from src.config import CLASSES, AugmentParams, TrainParams
from src.rawdata import DataError


class CachedImages(Dataset):
    """Rows of a uint8 (N, S, S, 3) cache: yields (HWC uint8 tensor, label); no JPEG decoding."""

    def __init__(self, cache_file: Path, rows: np.ndarray, labels: np.ndarray, transform=None):
        if not Path(cache_file).exists():
            raise DataError(f"{cache_file}: image cache not found; run `python -m src.split` (or `dvc repro split`)")
        self.cache_file, self.transform = Path(cache_file), transform
        self.rows, self.labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        self._images: np.ndarray | None = None  # opened lazily so each loader worker maps its own view
        if len(self.rows) and self.rows.max() >= self.images.shape[0]:
            raise DataError(f"{cache_file}: has {self.images.shape[0]} images but the split index asks "
                            f"for row {self.rows.max()}; rerun `dvc repro split`")

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.cache_file, mmap_mode="r")
        return self._images

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.images[self.rows[i]]))
        if self.transform is not None:
            img = self.transform(img.permute(2, 0, 1)).permute(1, 2, 0).contiguous()
        return img, int(self.labels[i])


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees: dermoscopy has no canonical orientation."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.rot90(img, int(torch.randint(4, ())), dims=(-2, -1))


def train_transform(aug: AugmentParams, size: int) -> v2.Compose:
    """Flips, 90-degree rotations, mild scale and colour jitter on uint8 CHW tensors."""
    steps: list[torch.nn.Module] = [v2.RandomResizedCrop(size, scale=(aug.scale_min, 1.0), ratio=(0.9, 1.1))]
    if aug.flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return v2.Compose(steps)


def subsample_lesions(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep `fraction` of the lesions of each class (whole lesions, so no lesion is split)."""
    if fraction >= 1.0:
        return df
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for _, lesions in df.groupby("dx")["lesion_id"]:
        unique = np.sort(lesions.unique())
        n = max(1, round(fraction * len(unique)))
        keep += rng.choice(unique, size=n, replace=False).tolist()
    return df[df["lesion_id"].isin(keep)]


def class_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Per-class weights: 1/count ('balanced'), 1/sqrt(count) ('sqrt') or ones, mean-normalised."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    power = {"balanced": 1.0, "sqrt": 0.5, "none": 0.0}[mode]
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return w / w[counts > 0].mean()


def make_sampler(labels: np.ndarray, mode: str) -> WeightedRandomSampler | None:
    """A WeightedRandomSampler drawing classes in proportion to count^(1-power); None for 'none'.

    It draws from torch's global RNG, which the training loop reseeds every epoch, so a resumed run
    sees the same batches as an uninterrupted one.
    """
    if mode == "none":
        return None
    weights = class_weights(labels, mode)[labels]
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(labels), replacement=True)


def default_workers(device: torch.device) -> int:
    # On a CPU the loader's workers compete with the compute threads for the same cores, and the cache
    # makes a sample cost microseconds; on an accelerator the host is otherwise idle.
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class SplitData:
    frame: pd.DataFrame
    dataset: CachedImages


def load_split(splits_dir: Path, cache_dir: Path, name: str, transform=None) -> SplitData:
    """Read one split's index and wrap its rows of the cache."""
    index = Path(splits_dir) / f"{name}.csv"
    if not index.exists():
        raise DataError(f"{index}: split index not found; run `python -m src.split` (or `dvc repro split`)")
    df = pd.read_csv(index, dtype={"lesion_id": str, "image_id": str})
    cache = Path(cache_dir) / ("isic2018_test.npy" if name == "isic2018_test" else "images.npy")
    return SplitData(df, CachedImages(cache, df["cache_row"].to_numpy(), df["label"].to_numpy(), transform))


def make_loader(dataset: Dataset, batch_size: int, device: torch.device, workers: int | None,
                sampler=None, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
    workers = default_workers(device) if workers is None else workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
        drop_last=drop_last, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )


def train_loader(split: SplitData, train: TrainParams, device: torch.device) -> DataLoader:
    """The training loader: class-balanced sampling (or a seeded shuffle) and drop_last."""
    labels = split.dataset.labels
    sampler = make_sampler(labels, train.sampler)
    drop_last = len(labels) > train.batch_size
    return make_loader(split.dataset, train.batch_size, device, train.num_workers, sampler=sampler,
                       shuffle=True, drop_last=drop_last)
