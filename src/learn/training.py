"""The train stage's training code, shared with tuning and the benchmark: data, model, fit and reports."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from src.config import ConfigError, Params
from src.fileio import read_json, write_json, write_text
from src.learn import distributed
from src.learn.checkpoint import LAST_FILE, CheckpointError, load_checkpoint
from src.learn.data import (
    CachedImages,
    ResizedImages,
    SplitData,
    class_weights,
    load_split,
    make_loader,
    subsample_lesions,
    train_loader,
    train_transform,
)
from src.learn.engine import EpochCallback, FitResult, Progressive, fit, seed_everything, select_device
from src.learn.model import Classifier, ModelError, build_model, freeze_early, token_stride

log = logging.getLogger(__name__)
HISTORY_COLUMNS = (
    "epoch",
    "train/loss",
    "val/loss",
    "val/accuracy",
    "val/balanced_accuracy",
    "lr",
    "train/images_per_s",
    "train/grad_norm",
    "val_ema/balanced_accuracy",
    "val/score",
    "train/image_size",
    "epoch_seconds",
)


@dataclass(frozen=True)
class TrainData:
    train: SplitData
    val: SplitData
    early: TrainData | None = None  # progressive resizing: both splits at train.progressive_size

    @property
    def image_size(self) -> int:
        return self.val.dataset.image_size


def load_train_data(params: Params, image_size: int | None = None) -> TrainData:
    """The train split (lesion-subsampled when train.train_fraction < 1, augmented) and the val split.

    `image_size` other than the cache's (tuning at a lower resolution) resizes both splits into memory.
    """
    paths, train = params.paths, params.train
    val = load_split(paths, "val")
    full = load_split(paths, "train")
    size = image_size or val.dataset.image_size
    frame = subsample_lesions(full.frame, train.train_fraction, train.seed)
    dataset = augmented(full.dataset, frame, params, size)
    if size != val.dataset.image_size:
        dataset, val = ResizedImages(dataset, size), SplitData(val.frame, ResizedImages(val.dataset, size))
    low = train.progressive_size
    if low is None:
        return TrainData(SplitData(frame, dataset), val)
    if low >= size:  # tune.image_size can set the final size below data.image_size
        raise ConfigError(f"train.progressive_size ({low}) must be below the training resolution ({size})")
    # the early epochs crop straight from the cache to the low size, so their augmentation costs what a low-size
    # profile's does (on a CPU it runs in the training process)
    early = TrainData(
        SplitData(frame, augmented(full.dataset, frame, params, low)),
        SplitData(val.frame, ResizedImages(val.dataset, low)),
    )
    return TrainData(SplitData(frame, dataset), val, early)


def augmented(cache: CachedImages, frame: pd.DataFrame, params: Params, size: int) -> CachedImages:
    """The frame's rows of the cache with the training augmentation, cropped to `size`."""
    return CachedImages(
        cache.cache_file,
        frame["cache_row"].to_numpy(),
        frame["label"].to_numpy(),
        train_transform(params.train.augment, size),
    )


def run_config(params: Params, image_size: int) -> dict:
    """What a checkpoint must match to be resumed: the model, the training params and the data."""
    split_hash = read_json(params.paths.reports / "split.json").get("split_hash", "unknown")
    return {
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json"),
        "data": {
            "image_size": image_size,
            "split_hash": split_hash,
            "shades_of_gray_power": params.data.shades_of_gray_power,
        },
        "processes": distributed.world_size(),  # another number of ranks splits the batches differently
    }


def resumable_checkpoint(checkpoint_dir: Path, config: dict) -> dict | None:
    """The last checkpoint when it was made by the same config; otherwise start afresh (and say why)."""
    last = checkpoint_dir / LAST_FILE
    if not last.exists():
        return None
    try:
        state = load_checkpoint(last)
    except CheckpointError as err:
        log.warning("ignoring unusable checkpoint: %s", err)
        return None
    if state["config"] != config:
        log.info("%s was made with other params or data; starting a new run", last)
        return None
    return state


def configure_threads(params: Params) -> torch.device:
    """The device to train on; on a CPU, train.threads per process or the machine's cores shared out among the
    processes torchrun started on it (torchrun itself would leave each one thread)."""
    device = distributed.setup(select_device(params.train.device))
    if device.type == "cpu":
        cores = max(1, (os.cpu_count() or 1) // distributed.local_world_size())
        torch.set_num_threads(params.train.threads or cores)
    return device


def make_runner(model: nn.Module, params: Params, device: torch.device) -> nn.Module:
    """What the loop calls: the model, compiled when asked, and in DDP when torchrun started several processes
    (DDP starts every rank from rank 0's weights and averages the gradients in backward)."""
    data_parallel = distributed.world_size() > 1
    if data_parallel and device.type == "cuda":  # batch norm (model.stem: conv) over the global batch: GPUs only
        convert_sync_batchnorm(model)  # timm's: keeps the activation fused in its BatchNormAct layers; in place
    runner = torch.compile(model) if params.train.compile else model
    if not data_parallel:
        return runner
    return DistributedDataParallel(runner, device_ids=[device] if device.type == "cuda" else None)


def run_training(
    params: Params,
    data: TrainData,
    checkpoint_dir: Path | None,
    resume: dict | None = None,
    on_epoch_end: EpochCallback | None = None,
    extra: dict | None = None,
) -> tuple[Classifier, FitResult]:
    """Build the model and fit it; the shared core of the train stage and of every tuning trial."""
    device = configure_threads(params)
    seed_everything(params.train.seed)
    any_size = data.early is not None
    model = build_model(params.model, data.image_size, params.data.shades_of_gray_power, any_size).to(device)
    freeze_early(model, params.train.freeze_blocks)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = make_runner(model, params, device)
    progressive = None
    if data.early is not None:
        progressive = Progressive(
            make_loaders(data.early, params, device),
            data.early.image_size,
            data.image_size,
            params.train.epochs - params.train.progressive_final_epochs,
        )
        check_token_grid(model, progressive.size)
    weight = None
    if params.train.class_weights != "none":
        weight = torch.tensor(class_weights(data.train.dataset.labels, params.train.class_weights), dtype=torch.float32)
    result = fit(
        runner,
        make_loaders(data, params, device),
        params.train,
        device,
        checkpoint_dir=checkpoint_dir,
        config=run_config(params, data.image_size),
        resume=resume,
        on_epoch_end=on_epoch_end,
        class_weight=weight,
        extra=extra,
        progressive=progressive,
    )
    return model, result


def make_loaders(data: TrainData, params: Params, device: torch.device) -> tuple:
    """The train loader (this rank's part of each batch) and this rank's part of val."""
    val_part = Subset(data.val.dataset, distributed.shard(len(data.val.dataset)).tolist())
    return (
        train_loader(data.train, params.train, device, distributed.rank(), distributed.world_size()),
        make_loader(val_part, params.evaluate.batch_size, device, params.train.num_workers),
    )


def check_token_grid(model: Classifier, size: int) -> None:
    """A progressive size must make whole tokens: a ViT's patch embedding would silently drop the remainder."""
    stride = token_stride(model)
    if size % stride:
        raise ModelError(
            f"train.progressive_size ({size}) must be a multiple of the model's patch size ({stride}), "
            f"e.g. {max(stride, size // stride * stride)}"
        )


def write_reports(result: FitResult, reports: Path) -> None:
    """Per-epoch history (DVC plots) and the best epoch's validation metrics (DVC metrics)."""
    history = pd.DataFrame(result.history)
    write_text(reports / "train_history.csv", history[[c for c in HISTORY_COLUMNS if c in history]].to_csv(index=False))
    write_json(
        reports / "train.json",
        {
            **{k: v for k, v in result.best_metrics.items() if k.startswith("val/")},
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
        },
    )
