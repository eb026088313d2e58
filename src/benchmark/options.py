"""What the benchmark measures and how long: the options that `python -m src.bench` sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchOptions:
    images: Path | None = None  # a folder of real images (or one holding images/); None = generated ones
    steps: int = 20  # timed training steps per measurement
    warmup: int = 3  # untimed steps before each timed run
    max_images: int = 2000  # cap on the images decoded into the cache (and the naive baseline's files)
    compile: bool = False  # add a row for the torch.compile'd model-only step
    workers: tuple[int, ...] = ()  # extra real-path rows with these loader worker counts
    precisions: tuple[str, ...] = ()  # fp32 and/or bf16; empty = fp32, and bf16 where the device has it natively
    ceiling_seconds: float = 2.0
    chunks: int = 4  # timed steps are split into chunks; the median chunk is reported (robust to CPU contention)
