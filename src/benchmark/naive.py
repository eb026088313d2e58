"""The naive baseline: what a typical notebook does, full-size JPEG decode and PIL transforms per sample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.benchmark.options import BenchOptions
from src.benchmark.timing import endless, loader_rate, prepared_model, runner, timed_training
from src.config import AugmentParams, Params
from src.learn.data import make_loader, make_sampler


class NaiveJpegs(Dataset):
    """What a typical notebook does: open and decode the full-size JPEG and run PIL transforms for every sample."""

    def __init__(self, files: list[Path], labels: np.ndarray, transform: Callable):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), int(self.labels[i])


def naive_transform(aug: AugmentParams, size: int, mean: list[float], std: list[float]) -> Callable:
    """Resize + CenterCrop, the same kinds of augmentation on PIL images, ToTensor + Normalize (torchvision v1)."""
    from torchvision import transforms as T

    steps: list = [
        T.Resize(size),
        T.CenterCrop(size),
        T.RandomResizedCrop(size, scale=(aug.scale_min, 1.0), ratio=(0.9, 1.1)),
    ]
    if aug.flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if aug.rot90:
        steps.append(T.RandomChoice([T.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def measure_naive(
    params: Params, size: int, device: torch.device, files: list[Path], labels: np.ndarray, opts: BenchOptions
) -> tuple[float, float]:
    """images/s of the same model and loop fed by NaiveJpegs (the backbone takes the normalised floats), and of
    that loader alone."""
    model = prepared_model(params, size, device)
    mean = (model.mean.flatten() / 255).tolist()
    std = (model.std.flatten() / 255).tolist()
    train = params.train
    dataset = NaiveJpegs(files, labels, naive_transform(train.augment, size, mean, std))
    loader = make_loader(
        dataset,
        train.batch_size,
        device,
        train.num_workers,
        sampler=make_sampler(labels, train.sampler),
        shuffle=True,
        drop_last=len(files) > train.batch_size,
    )
    stream = endless(loader)
    try:
        rate, _ = timed_training(runner(model.backbone, train.compile), stream, train, device, opts)
    finally:
        stream.close()
    return rate, loader_rate(loader, opts)
