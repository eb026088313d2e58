"""Each row of the benchmark measured: ceiling, model-only, torch.compile, the real training path, inference."""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from src.benchmark.machine import peak_rss_mb, reset_peak_memory
from src.benchmark.options import BenchOptions
from src.benchmark.timing import (
    endless,
    loader_rate,
    matmul_gflops,
    prepared_model,
    runner,
    timed_training,
    train_step_flops,
)
from src.config import CLASSES, Params, TrainParams
from src.learn.data import CachedImages, SplitData, train_loader, train_transform
from src.learn.engine import seed_everything
from src.learn.inference import classify
from src.learn.model import Probabilities, build_model
from src.learn.precision import autocast, native_bf16

log = logging.getLogger(__name__)


def measure_ceiling(device: torch.device, opts: BenchOptions, precision: str) -> dict[str, float]:
    """The device's matmul throughput in the precision the training step computes in (fp32 or bf16)."""
    n = 8192 if device.type == "cuda" else 2048
    if precision == "bf16" and not native_bf16(device):
        n = 512  # emulated bf16 runs at under 1 GFLOP/s (AMD Zen 3): one 2048 multiply would take minutes
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = {"ceiling_gflops": matmul_gflops(device, dtype, n, opts.ceiling_seconds)}
    log.info("%s ceiling %.0f GFLOP/s", precision, out["ceiling_gflops"])
    return out


def measure_model_only(
    params: Params, size: int, device: torch.device, opts: BenchOptions, ceiling: float
) -> dict[str, float]:
    """Random device tensors through the train stage's loop: the model's own speed, FLOPs and share of the ceiling."""
    train, batch = params.train, params.train.batch_size
    model = prepared_model(params, size, device)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    targets = torch.randint(0, len(CLASSES), (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    flops = train_step_flops(model, images, targets, loss_fn, device)
    out = {"train_step_gflop": flops / 1e9}
    out["model_only_images_per_s"], _ = timed_training(
        runner(model, train.compile), itertools.repeat((images, targets)), train, device, opts
    )
    out["model_only_gflops"] = flops * out["model_only_images_per_s"] / batch / 1e9
    out["model_only_ratio_to_ceiling"] = out["model_only_gflops"] / ceiling
    log.info("model-only %.1f images/s", out["model_only_images_per_s"])
    if opts.compile and not train.compile:
        out.update(measure_compiled(params, size, device, images, targets, opts, out["model_only_images_per_s"]))
    return out


def measure_real_path(
    params: Params, size: int, device: torch.device, cache: Path, labels: np.ndarray, opts: BenchOptions, eager: float
) -> dict[str, float]:
    """The train stage's loader over the cache (augmentation, sampling) feeding its loop; also the loader alone."""
    train = params.train
    rows = np.arange(len(labels))
    dataset = CachedImages(cache, rows, labels, train_transform(train.augment, size))
    split = SplitData(pd.DataFrame({"cache_row": rows, "label": labels}), dataset)
    reset_peak_memory(device)
    out = {
        "real_path_images_per_s": measure_loader(
            params, size, device, lambda t: train_loader(split, t, device), train, opts
        )
    }
    out["train_peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        out["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["real_path_ratio_to_model_only"] = out["real_path_images_per_s"] / eager
    out["real_loader_images_per_s"] = loader_rate(train_loader(split, train, device), opts)
    log.info(
        "real path %.1f images/s (%.2f of model-only)",
        out["real_path_images_per_s"],
        out["real_path_ratio_to_model_only"],
    )
    for w in opts.workers:
        alt = train.model_copy(update={"num_workers": w})
        rate = measure_loader(params, size, device, lambda t: train_loader(split, t, device), alt, opts)
        out[f"real_path_workers_{w}_images_per_s"] = rate
        log.info("real path with %d workers: %.1f images/s", w, rate)
    return out


def measure_loader(
    params: Params,
    size: int,
    device: torch.device,
    make: Callable[[TrainParams], DataLoader],
    train: TrainParams,
    opts: BenchOptions,
) -> float:
    """images/s of train_one_epoch on a fresh model over the loader that `make(train)` builds."""
    model = prepared_model(params, size, device)
    stream = endless(make(train))
    try:
        rate, _ = timed_training(runner(model, train.compile), stream, train, device, opts)
    finally:
        stream.close()  # shuts down the loader's workers
    return rate


def measure_compiled(
    params: Params,
    size: int,
    device: torch.device,
    images: torch.Tensor,
    targets: torch.Tensor,
    opts: BenchOptions,
    eager: float,
) -> dict[str, float]:
    """The model-only row again under torch.compile (skipped, with a warning, where compiling fails)."""
    model = prepared_model(params, size, device)
    try:
        rate, warmup_s = timed_training(
            torch.compile(model), itertools.repeat((images, targets)), params.train, device, opts
        )
    except Exception as err:  # inductor needs a working C++/Triton toolchain; report and go on without the row
        log.warning("torch.compile failed, no compiled row: %s: %s", type(err).__name__, str(err)[:300])
        return {}
    log.info("compiled model-only %.1f images/s (%.1f s to compile and warm up)", rate, warmup_s)
    out = {"compiled_model_only_images_per_s": rate, "compile_speedup": rate / eager, "compile_warmup_s": warmup_s}
    batch = params.train.batch_size
    if rate > eager:  # steps after which the compile time is won back
        out["compile_break_even_steps"] = warmup_s / (batch / eager - batch / rate)
    return out


def measure_inference(
    params: Params, files: list[Path], size: int, batch_size: int = 64, single: int = 20
) -> dict[str, float]:
    """The predict path (classify) on batches (median images/s, decode included) and on single files (median ms),
    in train.precision (fp32, or bf16 autocast as `predict --precision bf16` runs)."""
    cpu = torch.device("cpu")
    seed_everything(params.train.seed)
    model = Probabilities(build_model(params.model, size)).eval()
    with autocast(cpu, params.train.precision):
        return _timed_inference(model, files, size, batch_size, single)


def _timed_inference(model: nn.Module, files: list[Path], size: int, batch_size: int, single: int) -> dict:
    cpu = torch.device("cpu")
    classify(model, files[:batch_size], size, batch_size)  # warm-up
    reset_peak_memory(cpu)
    rates = []  # per batch; the median, as for training
    for first in range(0, len(files), batch_size):
        start = time.perf_counter()
        frame, _ = classify(model, files[first : first + batch_size], size, batch_size)
        rates.append(len(frame) / (time.perf_counter() - start))
    rate = statistics.median(rates)
    latencies = []
    for f in itertools.islice(itertools.cycle(files), single + 2):
        start = time.perf_counter()
        classify(model, [f], size)
        latencies.append(time.perf_counter() - start)
    log.info("inference %.1f images/s, %.1f ms per single image", rate, 1e3 * statistics.median(latencies[2:]))
    return {
        "inference_images_per_s": rate,
        "inference_single_latency_ms": 1e3 * statistics.median(latencies[2:]),
        "inference_peak_rss_mb": peak_rss_mb(),
    }
