"""Timing primitives: the matmul ceiling, FLOPs of a step, and the train stage's loop timed over a batch stream."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from src.benchmark.options import BenchOptions
from src.config import Params, TrainParams
from src.errors import UserError
from src.learn.engine import Schedule, make_optimizer, seed_everything, train_one_epoch
from src.learn.model import Classifier, build_model, freeze_early

log = logging.getLogger(__name__)


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
        loss = loss_fn(model(images), labels)  # FLOPs are the same in any precision
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
    """images/s of the loader alone (sampling, augmentation, collation): what it can feed, with no model.

    Timed in chunks of whole rounds of its workers, the median chunk's rate returned. N workers finish their
    batches together, so one batch's wait is mostly zero or a whole round: the median of per-batch rates read
    719,515 images/s for 8 workers on an H100 host whose real path trained at 917. A chunk of 4 rounds overstates
    by at most 4/3.
    """
    workers = max(loader.num_workers, 1)
    per_chunk = max(-(-opts.steps // opts.chunks), 4 * workers)
    stream = endless(loader)
    try:
        for _ in range(max(opts.warmup, workers)):  # the workers' first round: their start-up is not the rate
            next(stream)
        rates = [_chunk_rate(stream, per_chunk) for _ in range(min(opts.chunks, opts.steps))]
    finally:
        stream.close()
    return statistics.median(rates)


def _chunk_rate(stream: Iterator, batches: int) -> float:
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)[0])
    return images / (time.perf_counter() - start)


def prepared_model(params: Params, size: int, device: torch.device) -> Classifier:
    """The model as run_training prepares it (seeded, on the device, channels_last when configured)."""
    seed_everything(params.train.seed)
    model = build_model(params.model, size).to(device)
    freeze_early(model, params.train.freeze_blocks)
    return model.to(memory_format=torch.channels_last) if params.train.channels_last else model


def runner(model: nn.Module, compile_: bool) -> nn.Module:
    return torch.compile(model) if compile_ else model
