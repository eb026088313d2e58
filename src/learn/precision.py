"""The float precision training computes in: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere.

On CPUs with AMX or AVX512-BF16 (recent Intel Xeons) oneDNN runs bf16 matmuls at several times the fp32 rate;
on CPUs without them (AMD Zen 3, older Intel) bf16 is emulated and slower than fp32. So `auto` asks the
hardware, through what PyTorch itself checks before it picks oneDNN's bf16 kernels, never a CPU model name.
Training's per-epoch validation runs in the precision training resolved (it only ranks epochs). Evaluation and the
served MLflow model stay fp32: one export that serves anywhere, and the same probabilities everywhere; predict runs
bf16 only when asked (`--precision bf16|auto`).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
    """bf16 autocast for a resolved `bf16`, else a null context: the loop body is the same either way. On a CPU,
    attention that is being trained runs in fp32 inside it (FP32Attention)."""
    if precision != "bf16":
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(FP32Attention())
    return stack


class FP32Attention(TorchFunctionMode):
    """Scaled dot-product attention in fp32 where gradients flow through it, in a bf16 step on a CPU.

    PyTorch's CPU flash-attention backward is slow in bf16: on an Intel Xeon with AMX (torch 2.14) it took 48% of a
    ViT-Tiny step at 128 px, 37 ms a call against 6 ms in fp32, and the fp32 call made the whole bf16 step 1.63x faster
    (1.10x at 224 px); its forward is as fast in bf16, so inference (no gradients) keeps bf16. Nothing gets less
    precise: attention's inputs are upcast, its output cast back to the bf16 autocast gives it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled() and args[0].dtype == torch.bfloat16:
            q, k, v, *rest = (a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            mask = kwargs.get("attn_mask")
            if torch.is_tensor(mask) and mask.is_floating_point():
                kwargs = kwargs | {"attn_mask": mask.float()}
            with torch.autocast("cpu", enabled=False):
                return func(q, k, v, *rest, **kwargs).to(args[0].dtype)
        return func(*args, **kwargs)


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
