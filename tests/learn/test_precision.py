"""Training precision: auto follows the hardware's native bf16, and a forced precision is what the step runs in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from src.config import ModelParams, TrainParams
from src.learn.engine import Schedule, fit, make_optimizer, predict, train_one_epoch
from src.learn.model import build_model
from src.learn.precision import autocast, compute_description, cpu_features, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_picks_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    # the hardware probes PyTorch offers, answered as a Xeon with AMX, one with AVX512-BF16, an AMD Zen 3
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert compute_description("auto", CPU)["compute.precision"] == expected


def test_this_machines_features_are_reported_as_pytorch_sees_them():
    features = cpu_features()
    assert features["capability"] == torch.backends.cpu.get_cpu_capability()
    native = bool(features["amx_tile"] or features["avx512_bf16"])
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_training_step_computes_in_the_precision_asked(precision, dtype):
    torch.manual_seed(0)
    model = build_model(ModelParams(name="test_vit", pretrained=False), 32)
    seen = []
    model.backbone.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    train = TrainParams(precision=precision, lr=1e-3)
    batches = [(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), torch.arange(8) % 7) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_one_epoch(
        model, batches, make_optimizer(model, train, CPU), nn.CrossEntropyLoss(), train, Schedule(2, 0), CPU
    )
    assert seen == [dtype, dtype] and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights either way
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_validates_in_its_own_precision_and_predict_stays_fp32_by_default(precision, dtype):
    # val only ranks the epochs: in bf16 it costs less than half of fp32 at 224 px on a CPU with bf16 units
    torch.manual_seed(0)
    model = build_model(ModelParams(name="test_vit", pretrained=False), 32)
    seen = []
    model.backbone.head.register_forward_hook(
        lambda module, inputs, output: seen.append((module.training, output.dtype))
    )
    images, labels = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8), torch.arange(16) % 7
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    train = TrainParams(precision=precision, epochs=1, lr=1e-3, warmup_epochs=0, ema_decay=0.9)
    fit(model, (loader, loader), train, CPU)
    assert {dtype for training, dtype in seen if not training} == {dtype}  # the raw and the EMA weights
    assert sum(not training for training, _ in seen) == 4  # 2 val batches for each of the raw and EMA weights
    seen.clear()
    predict(model, loader, CPU)  # evaluate's default: what the fp32 export serves
    assert {dtype for _, dtype in seen} == {torch.float32}


class SdpaInputs(TorchFunctionMode):
    """Records the dtype scaled_dot_product_attention is called with, beneath the modes entered after it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_a_bf16_cpu_step_trains_attention_in_fp32_and_infers_it_in_bf16():
    # the CPU's bf16 flash-attention backward is slow (docs/speed.md); its forward is not
    torch.manual_seed(0)
    model = build_model(ModelParams(name="test_vit", pretrained=False), 32).eval()  # no dropout: same logits twice
    images, labels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.arange(4)
    with SdpaInputs() as trained, autocast(CPU, "bf16"):
        logits = model(images)
    nn.CrossEntropyLoss()(logits, labels).backward()
    assert trained.dtypes and set(trained.dtypes) == {torch.float32} and logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with SdpaInputs() as inferred, torch.no_grad(), autocast(CPU, "bf16"):
        served = model(images)
    assert set(inferred.dtypes) == {torch.bfloat16}
    torch.testing.assert_close(served.float(), logits.detach().float(), atol=0.05, rtol=0.05)
    with SdpaInputs() as plain, autocast(CPU, "fp32"):
        model(images)
    assert set(plain.dtypes) == {torch.float32}
