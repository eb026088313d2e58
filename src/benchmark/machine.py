"""Memory and machine facts for the report: peak RSS (resettable on Linux), CPU or GPU name, load, cores."""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: resident-set high-water mark (Linux clear_refs) and the CUDA allocator's peak."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.debug("cannot reset the RSS peak; ru_maxrss will be the process's lifetime peak")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB (workers' memory not included)."""
    peak_mb = _status_mb("VmHWM")
    if peak_mb is not None:
        return peak_mb
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


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


def loadavg() -> float:
    """The 1-minute load average at the end: above the thread count, the timings shared the CPUs with others."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
