"""The whole benchmark in one process: every measure in turn, then a description of what was measured on what.

Everything is measured for the configured model (model.*), size (data.image_size) and training params (train.*).
The image cache is built in a temp dir with src.prepare.imaging.load_image, as the split stage does.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src.benchmark.inputs import benchmark_images, build_cache
from src.benchmark.machine import cpu_count, current_rss_mb, device_name, loadavg
from src.benchmark.measures import (
    measure_ceiling,
    measure_inference,
    measure_model_only,
    measure_real_path,
)
from src.benchmark.naive import measure_naive
from src.benchmark.options import BenchOptions
from src.config import Params
from src.learn.data import default_workers
from src.learn.precision import cpu_features, native_bf16
from src.learn.training import configure_threads

log = logging.getLogger(__name__)


def run_benchmark(params: Params, opts: BenchOptions) -> dict:
    """Cache the images, then every measure in each precision (`measure_precision`); `config` says on what."""
    device = configure_threads(params)
    size = params.data.image_size
    out: dict = {"baseline_rss_mb": current_rss_mb()}  # the process with torch & co. imported, before any work
    precisions = bench_precisions(device, opts.precisions)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        files, labels, source = benchmark_images(opts, Path(tmp))
        start = time.perf_counter()
        cache = Path(tmp) / "images.npy"
        kept = build_cache(files, size, cache)
        files, labels = [files[i] for i in kept], labels[kept]
        out["cache_build_images_per_s"] = len(files) / (time.perf_counter() - start)
        log.info("%d images (%s) cached at %d px", len(files), source, size)
        inputs, out["precisions"] = BenchInputs(files, labels, cache), {}
        for precision in precisions:
            at = params.model_copy(update={"train": params.train.model_copy(update={"precision": precision})})
            out["precisions"][precision] = measure_precision(at, device, inputs, opts)
    out["config"] = bench_config(params, device, opts, source, len(files)) | {"precisions": precisions}
    return out


def bench_precisions(device: torch.device, asked: tuple[str, ...]) -> list[str]:
    """The precisions to measure: those asked for, else fp32 and, where the device multiplies it natively, bf16."""
    if asked:
        return list(dict.fromkeys(asked))
    return ["fp32", "bf16"] if native_bf16(device) else ["fp32"]


@dataclass(frozen=True)
class BenchInputs:
    files: list[Path]
    labels: np.ndarray
    cache: Path


def measure_precision(params: Params, device: torch.device, inputs: BenchInputs, opts: BenchOptions) -> dict:
    """Ceiling, inference, model-only, real path and naive baseline, all in params.train.precision."""
    size, batch = params.data.image_size, params.train.batch_size
    precision = params.train.precision
    log.info("measuring in %s", precision)
    out = measure_ceiling(device, opts, precision)
    # inference first, so its peak is not the training's: the predict path (CPU tensors, as predict runs)
    out.update(measure_inference(params, inputs.files[: max(batch, opts.steps * 64)], size))
    out.update(measure_model_only(params, size, device, opts, out["ceiling_gflops"]))
    eager = out["model_only_images_per_s"]
    out.update(measure_real_path(params, size, device, inputs.cache, inputs.labels, opts, eager))
    # the naive baseline: decode + PIL transforms per sample, the same model (fed floats) and loop
    out["naive_images_per_s"], out["naive_loader_images_per_s"] = measure_naive(
        params, size, device, inputs.files, inputs.labels, opts
    )
    out["speedup_over_naive"] = out["real_path_images_per_s"] / out["naive_images_per_s"]
    out["loader_speedup_over_naive"] = out["real_loader_images_per_s"] / out["naive_loader_images_per_s"]
    log.info("naive %.1f images/s", out["naive_images_per_s"])
    return out


def bench_config(params: Params, device: torch.device, opts: BenchOptions, source: str, n_images: int) -> dict:
    """What was measured, on what: model, size, threads and workers, machine and library versions."""
    train = params.train
    return {
        "device": str(device),
        "device_name": device_name(device),
        "model": params.model.name,
        "image_size": params.data.image_size,
        "batch_size": train.batch_size,
        "threads": torch.get_num_threads(),
        "workers": train.num_workers if train.num_workers is not None else default_workers(device),
        "cpu_count": cpu_count(),
        "channels_last": train.channels_last,
        "compile": train.compile,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "images": source,
        "n_images": n_images,
        "torch": torch.__version__,
        "loadavg_1m": round(loadavg(), 2),
        "cpu_features": cpu_features(),
        "inference_device": "cpu",
        "python": platform.python_version(),
    }
