"""Speed benchmark: the device's ceiling, model-only and real training throughput, a naive baseline, inference.

    python -m src.bench [--params params.yaml] [-S key=value ...] [--images DIR] [--steps N] [--max-images N]
                        [--output bench/bench.json] [--compile] [--workers N ...]

Everything is measured in one process for the configured model (model.*), size (data.image_size) and training
params (train.*). The image cache is built here in a temp dir with src.imaging.load_image, as the split stage does.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from src import cli
from src.config import CLASSES, AugmentParams, Params, TrainParams
from src.errors import UserError
from src.fileio import write_json
from src.ingest.synthetic import make_dataset
from src.learn.data import (
    CachedImages,
    SplitData,
    default_workers,
    make_loader,
    make_sampler,
    train_loader,
    train_transform,
)
from src.learn.engine import Schedule, autocast, make_optimizer, seed_everything, train_one_epoch
from src.learn.inference import IMAGE_SUFFIXES, classify
from src.learn.model import Classifier, Probabilities, build_model
from src.learn.training import configure_threads
from src.prepare.imaging import ImageReadError, load_image

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = Path("bench/bench.json")


@dataclass(frozen=True)
class BenchOptions:
    images: Path | None = None  # a folder of real images (or one holding images/); None = generated ones
    steps: int = 20  # timed training steps per measurement
    warmup: int = 3  # untimed steps before each timed run
    max_images: int = 2000  # cap on the images decoded into the cache (and the naive baseline's files)
    compile: bool = False  # add a row for the torch.compile'd model-only step
    workers: tuple[int, ...] = ()  # extra real-path rows with these loader worker counts
    ceiling_seconds: float = 2.0
    chunks: int = 4  # timed steps are split into chunks; the median chunk is reported (robust to CPU contention)


# ---- inputs -------------------------------------------------------------------------------------------------


def find_image_files(folder: Path) -> list[Path]:
    """Image files of `folder`/images, or of `folder` itself (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    root = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no image files in {root}")
    return files


def read_labels(folder: Path, files: list[Path], seed: int = 0) -> np.ndarray:
    """Class indices from a metadata CSV (image_id, dx) in `folder`; random ones for images it does not list."""
    known: dict[str, int] = {}
    for csv in sorted(Path(folder).glob("*.csv")):
        try:
            df = pd.read_csv(csv, usecols=["image_id", "dx"], dtype=str)
        except (ValueError, OSError):
            continue
        known.update(
            {i: CLASSES.index(d) for i, d in zip(df["image_id"], df["dx"].str.lower(), strict=True) if d in CLASSES}
        )
    rng = np.random.default_rng(seed)
    return np.array([known.get(p.stem, int(rng.integers(len(CLASSES)))) for p in files], dtype=np.int64)


def benchmark_images(opts: BenchOptions, workdir: Path) -> tuple[list[Path], np.ndarray, str]:
    """Files, labels and a description: the real folder when given, otherwise generated HAM10000-like JPEGs."""
    if opts.images is not None:
        files = find_image_files(opts.images)[: opts.max_images]
        return files, read_labels(opts.images, files), str(opts.images)
    raw = workdir / "raw"
    make_dataset(raw, n_lesions=max(len(CLASSES), math.ceil(opts.max_images / 2)), seed=0, duplicates=0)
    files = find_image_files(raw)[: opts.max_images]
    return files, read_labels(raw, files), "synthetic"


def build_cache(files: list[Path], size: int, path: Path) -> list[int]:
    """Decode `files` with load_image (as the split stage does) into a uint8 (N, S, S, 3) .npy; the rows kept."""
    arrays, kept = [], []
    for i, f in enumerate(files):
        try:
            arrays.append(load_image(f, size))
            kept.append(i)
        except ImageReadError as err:
            log.warning("skipped %s", err)
    if not arrays:
        raise UserError("no readable images for the benchmark")
    np.save(path, np.stack(arrays))
    return kept


# ---- measuring ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """Throughput of a large square matrix multiply: the compute ceiling for this device and dtype."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.mm(a, b)
    sync(device)
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best, reps = min(best, time.perf_counter() - tick), reps + 1
    return 2 * n**3 / best / 1e9  # the best repetition: a ceiling, not an average over other users' load


def train_step_flops(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module, device: torch.device
) -> float:
    """FLOPs of one forward + backward (matmuls, convolutions, attention; the optimizer's elementwise work is free).

    Attention runs on the math backend while counting, so that its matmuls are counted on every device.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = loss_fn(model(images), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class Steps:
    """`n` batches taken from a shared endless stream, with a length: all train_one_epoch needs of a loader."""

    def __init__(self, stream: Iterator, n: int):
        self.stream, self.n = stream, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return itertools.islice(self.stream, self.n)


def endless(loader: Iterable) -> Iterator:
    """Pass after pass over a loader (warm-up and timed steps share it, so nothing prefetched is thrown away)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the benchmark's loader yields no batches; use more images or a smaller batch")


def timed_training(
    model: nn.Module, stream: Iterator, train: TrainParams, device: torch.device, opts: BenchOptions
) -> tuple[float, float]:
    """(images/s, seconds of warm-up) of the train stage's loop over `opts.steps` batches after warm-up.

    The steps run back to back in `opts.chunks` calls of train_one_epoch (so a loader's prefetching carries on
    across them) and the median chunk's rate is returned: a burst of other work on a shared CPU moves one chunk,
    not the figure.
    """
    raw = getattr(model, "_orig_mod", model)
    optimizer = make_optimizer(raw, train, device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)  # as engine.fit builds it
    sched = Schedule(total_steps=opts.warmup + opts.steps, warmup_steps=1)
    start = time.perf_counter()
    train_one_epoch(model, Steps(stream, opts.warmup), optimizer, loss_fn, train, sched, device, desc="warm-up")
    warmup_s = time.perf_counter() - start
    chunks = min(opts.chunks, opts.steps)
    rates = [
        train_one_epoch(model, Steps(stream, n), optimizer, loss_fn, train, sched, device, desc="bench")[
            "train/images_per_s"
        ]
        for n in np.diff(np.linspace(0, opts.steps, chunks + 1).round().astype(int)).tolist()
    ]
    log.info("chunks: %s images/s", ", ".join(f"{r:.1f}" for r in rates))
    return statistics.median(rates), warmup_s


def loader_rate(loader: DataLoader, opts: BenchOptions) -> float:
    """images/s of the loader alone (sampling, augmentation, collation): what it can feed, with no model."""
    stream = endless(loader)
    try:
        for _ in range(opts.warmup):
            next(stream)
        rates = []
        for _ in range(opts.steps):
            start = time.perf_counter()
            images, _labels = next(stream)
            rates.append(len(images) / (time.perf_counter() - start))
    finally:
        stream.close()
    return statistics.median(rates)


def prepared_model(params: Params, size: int, device: torch.device) -> Classifier:
    """The model as run_training prepares it (seeded, on the device, channels_last when configured)."""
    seed_everything(params.train.seed)
    model = build_model(params.model, size).to(device)
    return model.to(memory_format=torch.channels_last) if params.train.channels_last else model


def runner(model: nn.Module, compile_: bool) -> nn.Module:
    return torch.compile(model) if compile_ else model


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: resident-set high-water mark (Linux clear_refs) and the CUDA allocator's peak."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.debug("cannot reset the RSS peak; ru_maxrss will be the process's lifetime peak")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB (workers' memory not included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---- the naive baseline -------------------------------------------------------------------------------------


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


# ---- the benchmark ------------------------------------------------------------------------------------------


def run_benchmark(params: Params, opts: BenchOptions) -> dict:
    """Measure ceiling, model-only, real path, naive baseline and inference; a flat dict of numbers + `config`."""
    device = configure_threads(params)
    train, size, batch = params.train, params.data.image_size, params.train.batch_size
    workers = train.num_workers if train.num_workers is not None else default_workers(device)
    out: dict = {"baseline_rss_mb": current_rss_mb()}  # the process with torch & co. imported, before any work
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        files, labels, source = benchmark_images(opts, Path(tmp))
        start = time.perf_counter()
        cache = Path(tmp) / "images.npy"
        kept = build_cache(files, size, cache)
        files, labels = [files[i] for i in kept], labels[kept]
        out["cache_build_images_per_s"] = len(files) / (time.perf_counter() - start)
        log.info("%d images (%s) cached at %d px", len(files), source, size)

        # 1. the device's ceiling
        n = 8192 if device.type == "cuda" else 2048
        out["ceiling_gflops"] = matmul_gflops(device, torch.float32, n, opts.ceiling_seconds)
        if device.type == "cuda":
            out["ceiling_bf16_gflops"] = matmul_gflops(device, torch.bfloat16, n, opts.ceiling_seconds)
        ceiling = out.get("ceiling_bf16_gflops", out["ceiling_gflops"])  # the dtype the training step computes in
        log.info("ceiling %.0f GFLOP/s", ceiling)

        # 5. inference first, so its peak is not the training's: the predict path (CPU tensors, as predict runs)
        out.update(measure_inference(params, files[: max(batch, opts.steps * 64)], size))

        # 2. model-only: random device tensors through the same loop
        model = prepared_model(params, size, device)
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        targets = torch.randint(0, len(CLASSES), (batch,), device=device)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
        flops = train_step_flops(model, images, targets, loss_fn, device)
        out["train_step_gflop"] = flops / 1e9
        out["model_only_images_per_s"], _ = timed_training(
            runner(model, train.compile), itertools.repeat((images, targets)), train, device, opts
        )
        out["model_only_gflops"] = flops * out["model_only_images_per_s"] / batch / 1e9
        out["model_only_ratio_to_ceiling"] = out["model_only_gflops"] / ceiling
        log.info("model-only %.1f images/s", out["model_only_images_per_s"])
        if opts.compile and not train.compile:
            out.update(measure_compiled(params, size, device, images, targets, opts, out["model_only_images_per_s"]))
        del model

        # 3. the real path: the train stage's loader over the cache, with augmentation and sampling
        rows = np.arange(len(files))
        dataset = CachedImages(cache, rows, labels, train_transform(train.augment, size))
        split = SplitData(pd.DataFrame({"cache_row": rows, "label": labels}), dataset)
        reset_peak_memory(device)
        out["real_path_images_per_s"] = measure_loader(
            params, size, device, lambda t: train_loader(split, t, device), train, opts
        )
        out["train_peak_rss_mb"] = peak_rss_mb()
        if device.type == "cuda":
            out["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["real_path_ratio_to_model_only"] = out["real_path_images_per_s"] / out["model_only_images_per_s"]
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

        # 4. the naive baseline: decode + PIL transforms per sample, the same model (fed floats) and loop
        out["naive_images_per_s"], out["naive_loader_images_per_s"] = measure_naive(
            params, size, device, files, labels, opts
        )
        out["speedup_over_naive"] = out["real_path_images_per_s"] / out["naive_images_per_s"]
        out["loader_speedup_over_naive"] = out["real_loader_images_per_s"] / out["naive_loader_images_per_s"]
        log.info("naive %.1f images/s", out["naive_images_per_s"])

    out["config"] = {
        "device": str(device),
        "device_name": device_name(device),
        "model": params.model.name,
        "image_size": size,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "workers": workers,
        "cpu_count": _cpu_count(),
        "channels_last": train.channels_last,
        "compile": train.compile,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "images": source,
        "n_images": len(files),
        "torch": torch.__version__,
        "loadavg_1m": round(_loadavg(), 2),
        "autocast": "bf16" if device.type == "cuda" else "none",
        "ceiling_dtype": "bf16" if device.type == "cuda" else "fp32",
        "inference_device": "cpu",
        "python": platform.python_version(),
    }
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


def measure_inference(
    params: Params, files: list[Path], size: int, batch_size: int = 64, single: int = 20
) -> dict[str, float]:
    """predict.classify on batches of files (median images/s, decode included) and on single files (median ms)."""
    cpu = torch.device("cpu")
    seed_everything(params.train.seed)
    model = Probabilities(build_model(params.model, size)).eval()
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float:
    """The 1-minute load average at the end: above the thread count, the timings shared the CPUs with others."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- reporting ----------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The figures as a plain-text table."""
    c, r = result["config"], result
    rows = [("device ceiling, fp32 matmul", f"{r['ceiling_gflops']:.1f}", "GFLOP/s", "")]
    if "ceiling_bf16_gflops" in r:
        rows.append(("device ceiling, bf16 matmul", f"{r['ceiling_bf16_gflops']:.1f}", "GFLOP/s", ""))
    rows += [
        (
            "model-only train step",
            f"{r['model_only_images_per_s']:.1f}",
            "images/s",
            f"{r['model_only_gflops']:.1f} GFLOP/s = {r['model_only_ratio_to_ceiling']:.2f} of ceiling "
            f"({r['train_step_gflop']:.1f} GFLOP/step)",
        ),
    ]
    if "compiled_model_only_images_per_s" in r:
        verdict = (
            f"pays after {r['compile_break_even_steps']:.0f} steps"
            if r["compile_speedup"] > 1.05
            else "does not pay; keep train.compile off"
        )
        rows.append(
            (
                "model-only, torch.compile",
                f"{r['compiled_model_only_images_per_s']:.1f}",
                "images/s",
                f"{r['compile_speedup']:.2f}x eager, {r['compile_warmup_s']:.0f} s warm-up: {verdict}",
            )
        )
    rows.append(
        (
            "real path (train_loader + train_one_epoch)",
            f"{r['real_path_images_per_s']:.1f}",
            "images/s",
            f"{r['real_path_ratio_to_model_only']:.2f} of model-only ({c['workers']} workers)",
        )
    )
    rows.append(
        (
            "  its loader alone (no model)",
            f"{r['real_loader_images_per_s']:.1f}",
            "images/s",
            f"{r['real_loader_images_per_s'] / r['model_only_images_per_s']:.1f}x what the model consumes",
        )
    )
    for key in sorted(k for k in r if k.startswith("real_path_workers_")):
        w = key.removeprefix("real_path_workers_").removesuffix("_images_per_s")
        rows.append(
            (
                f"real path, {w} workers",
                f"{r[key]:.1f}",
                "images/s",
                f"{r[key] / r['model_only_images_per_s']:.2f} of model-only",
            )
        )
    baseline = f"main process; {r['baseline_rss_mb']:.0f} MiB with the libraries imported, before any work"
    rows += [
        (
            "naive baseline (JPEG decode + PIL per sample)",
            f"{r['naive_images_per_s']:.1f}",
            "images/s",
            f"real path is {r['speedup_over_naive']:.1f}x faster",
        ),
        (
            "  its loader alone (no model)",
            f"{r['naive_loader_images_per_s']:.1f}",
            "images/s",
            f"the real path's loader is {r['loader_speedup_over_naive']:.1f}x faster",
        ),
        ("inference, predict.classify batches", f"{r['inference_images_per_s']:.1f}", "images/s", "decode included"),
        ("inference, single image", f"{r['inference_single_latency_ms']:.1f}", "ms", "median"),
        ("peak RSS, training (real path)", f"{r['train_peak_rss_mb']:.0f}", "MiB", baseline),
        ("peak RSS, inference", f"{r['inference_peak_rss_mb']:.0f}", "MiB", baseline),
    ]
    if "train_peak_cuda_mb" in r:
        rows.append(("peak CUDA memory, training", f"{r['train_peak_cuda_mb']:.0f}", "MiB", ""))
    head = (
        f"{c['model']} at {c['image_size']} px, batch {c['batch_size']}, {c['device']} ({c['device_name']}), "
        f"{c['threads']} threads, {c['workers']} workers, {c['n_images']} images ({c['images']}), "
        f"{c['steps']} steps, torch {c['torch']}"
    )
    width = max(len(row[0]) for row in rows)
    lines = [head, f"{'measure':<{width}}  {'value':>9}  {'unit':<8}  note"]
    lines += [f"{name:<{width}}  {value:>9}  {unit:<8}  {note}".rstrip() for name, value, unit, note in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Benchmark training and inference speed for the configured model and image size.")
    p.add_argument("--images", type=Path, help="folder of real images (or one holding images/); default: generated")
    p.add_argument("--steps", type=int, default=BenchOptions.steps, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=BenchOptions.warmup, help="untimed steps first (default 3)")
    p.add_argument("--max-images", type=int, default=BenchOptions.max_images, help="cap on images used (default 2000)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON to write (default {DEFAULT_OUTPUT})")
    p.add_argument("--compile", action="store_true", help="add a row for the torch.compile'd model-only step")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also time the real path with these loader worker counts, e.g. --workers 0 1",
    )
    args = p.parse_args(argv)

    def body() -> int:
        if args.steps < 1 or args.warmup < 1 or args.max_images < 1 or any(w < 0 for w in args.workers):
            raise UserError("--steps, --warmup and --max-images must be positive, --workers not negative")
        opts = BenchOptions(
            images=args.images,
            steps=args.steps,
            warmup=args.warmup,
            max_images=args.max_images,
            compile=args.compile,
            workers=tuple(args.workers),
        )
        result = run_benchmark(cli.load(args), opts)
        write_json(args.output, result)
        print(format_table(result))
        print(args.output)
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
