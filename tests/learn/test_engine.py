import math

import numpy as np
import pytest
import torch
from torch import nn

from src.config import ModelParams, TrainParams
from src.learn.engine import clip_gradients, lr_at, make_optimizer, param_groups
from src.learn.metrics import full_metrics, summary_metrics
from src.learn.model import build_model

CPU = torch.device("cpu")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelParams(name="test_vit", pretrained=False), 32)


def test_weight_decay_skips_norms_biases_and_tokens(model):
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "backbone.pos_embed" in exempt and "backbone.cls_token" in exempt
    assert all(not n.endswith("bias") and "norm" not in n for n in decayed)
    assert any("qkv.weight" in n for n in decayed)
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_optimizer_gets_lr_and_weight_decay(model):
    opt = make_optimizer(model, TrainParams(lr=0.003, weight_decay=0.2), CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["lr"] == 0.003 for g in opt.param_groups)


def _backward(model):
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])) * 1000
    loss.backward()


def _grad_norm(model):
    return torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


def test_clipping_bounds_the_gradient_norm(model):
    _backward(model)
    before = clip_gradients(model, TrainParams(clip_grad_norm=0.5)).item()
    assert before > 0.5
    assert _grad_norm(model) == pytest.approx(0.5, rel=1e-3)


def test_clipping_by_value_and_off(model):
    _backward(model)
    clip_gradients(model, TrainParams(clip_grad_norm=None, clip_grad_value=1e-4))
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) <= 1e-4 + 1e-12
    model.zero_grad()
    _backward(model)
    norm = _grad_norm(model)
    assert clip_gradients(model, TrainParams(clip_grad_norm=None)).item() == pytest.approx(norm, rel=1e-4)
    assert _grad_norm(model) == pytest.approx(norm, rel=1e-4)


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5, abs=1e-6)
    assert lr_at(55, 100, 10, 1e-3, 0.0) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.5)))


def test_balanced_accuracy_is_mean_recall():
    labels = np.array([5] * 8 + [4] * 2)
    probs = np.zeros((10, 7))
    probs[:, 5] = 1  # always "nv": 80 % accurate, but blind to melanoma
    m = summary_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(0.8) and m["balanced_accuracy"] == pytest.approx(0.5)
    full = full_metrics(labels, probs)
    assert full["melanoma_sensitivity"] == 0.0 and full["melanoma_specificity"] == 1.0
    assert full["recall_nv"] == 1.0 and full["recall_mel"] == 0.0
