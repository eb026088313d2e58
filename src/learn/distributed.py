"""Data-parallel training with torch.distributed: torchrun starts the processes, DDP syncs the gradients.

`python -m src.train` with `train.nproc: N` re-launches itself through torchrun on this machine; several machines
run `torchrun --nnodes ...` themselves. Every process trains on its share of each global batch (gloo on a CPU,
nccl on CUDA); only global rank 0 writes checkpoints, reports and MLflow. Outside torchrun every helper here is a
no-op for a single process, so the training code calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from src.errors import UserError

log = logging.getLogger(__name__)
# a rank that waits for another (rank 0 logging to a slow tracking server, say) must not time out early
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class DistributedError(UserError, RuntimeError):
    """A data-parallel setting that cannot work; the message says what to change."""


def launched() -> bool:
    """True in a process started by torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK, ...)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launch(nproc: int, argv: list[str]) -> int:
    """Run this train command again as `nproc` processes on this machine through torchrun; its exit status."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine: a local rendezvous on a free port
        f"--nproc-per-node={nproc}",
        "-m",
        "src.train",
        *argv,
    ]
    log.info("train.nproc=%d: starting %s", nproc, " ".join(command[1:]))
    return subprocess.run(command, check=False).returncode


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo elsewhere); this process's device."""
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} GPUs; "
                "use --nproc-per-node (or train.nproc) at most the GPU count"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedError(f"train.device: data-parallel training runs on cpu or cuda, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        if not is_main():  # one copy of every log line: rank 0's
            logging.getLogger().setLevel(logging.WARNING)
        log.info("data-parallel training: %d processes (%s)", world_size(), dist.get_backend())
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a resume checkpoint read once, even without a shared disk)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (itself in one process)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard(n: int) -> np.ndarray:
    """This rank's contiguous part of n rows (evaluation: each rank predicts a part, `gather_rows` joins them)."""
    return np.array_split(np.arange(n), world_size())[rank()]


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's `shard` of an array joined in rank order: the whole array, identical on all ranks."""
    if world_size() == 1:
        return rows
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts)
