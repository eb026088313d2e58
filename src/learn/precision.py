"""The float precision training computes in: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere.

On CPUs with AMX or AVX512-BF16 (recent Intel Xeons) oneDNN runs bf16 matmuls at several times the fp32 rate;
on CPUs without them (AMD Zen 3, older Intel) bf16 is emulated and slower than fp32. So `auto` asks the
hardware, through what PyTorch itself checks before it picks oneDNN's bf16 kernels, never a CPU model name.
Training's per-epoch validation runs in the precision training resolved (it only ranks epochs). Evaluation and the
served MLflow model stay fp32: one export that serves anywhere, and the same probabilities everywhere; predict runs
bf16 only when asked (`--precision bf16|auto`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_features() -> dict[str, bool | str]:
    """The CPU's vector and matrix units as PyTorch sees them (logged with every training run)."""
    probes = {
        "amx_tile": "_is_amx_tile_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "avx512": "_is_avx512_supported",
        "avx2": "_is_avx2_supported",
    }
    features: dict[str, bool | str] = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)  # private helpers; a torch without one reports False
        features[name] = bool(check()) if check is not None else False
    return features


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        features = cpu_features()
        return bool(features["amx_tile"] or features["avx512_bf16"])
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on hardware with native bf16, fp32 elsewhere; `fp32` and `bf16` as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for a resolved `bf16`, else a null context: the loop body is the same either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def compute_description(precision: str, device: torch.device) -> dict[str, str]:
    """What training computes in and on, for the run's tags: device, resolved precision, the CPU's units."""
    features = cpu_features()
    units = [name for name in ("amx_tile", "avx512_bf16", "avx512", "avx2") if features[name]]
    return {
        "compute.device": str(device),
        "compute.precision": resolve_precision(precision, device),
        "compute.cpu_capability": str(features["capability"]),
        "compute.cpu_units": " ".join(units) or "none",
    }
