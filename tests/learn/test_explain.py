"""Explanation maps: each method's maps of the right shape that leave the prediction unchanged, and the gallery's
picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.config import ModelParams
from src.learn.explain import (
    DEFAULT_METHOD,
    METHODS,
    ExplainError,
    attention_rollout,
    check_explainable,
    explain_map,
    gallery_picks,
    recorded_attention,
)
from src.learn.model import Probabilities, build_model


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_model(ModelParams(name="test_vit", pretrained=False, patch_size=8), 32).eval()


def test_rollout_gives_one_map_per_image_and_changes_nothing(vit):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        fused = vit(torch.from_numpy(images))
        with recorded_attention(vit) as records:
            explicit = vit(torch.from_numpy(images))
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)  # the recorded path computes the same logits
    tokens = 1 + 16  # class token + a 4x4 grid of 8-px patches
    assert [r.shape for r in records] == [(3, vit.backbone.blocks[0].attn.num_heads, tokens, tokens)] * len(
        vit.backbone.blocks
    )
    assert all(b.attn.fused_attn == vit.backbone.blocks[0].attn.fused_attn for b in vit.backbone.blocks)
    maps = attention_rollout(vit, images)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1])  # each image its own map
    assert all(not b.attn.attn_drop._forward_hooks for b in vit.backbone.blocks)  # hooks removed


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_a_deterministic_map_in_0_1_per_image(vit, method):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    maps = explain_map(vit, images, method)
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1])  # each image its own map
    assert np.array_equal(maps, explain_map(vit, images, method))
    np.testing.assert_allclose(explain_map(vit, images[1:], method), maps[1:], atol=1e-5)  # images do not mix
    assert all(not b.attn.attn_drop._forward_hooks for b in vit.backbone.blocks)  # hooks removed
    assert not any(p.grad is not None for p in vit.parameters())  # the gradient methods leave no gradients behind


def test_the_methods_differ_and_the_gradient_ones_explain_the_class_asked_for(vit):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    maps = {method: explain_map(vit, images, method) for method in METHODS}
    assert DEFAULT_METHOD in METHODS and np.array_equal(maps["rollout"], attention_rollout(vit, images))
    assert not any(np.allclose(maps[a], maps[b]) for a in METHODS for b in METHODS if a < b)
    with torch.inference_mode():
        predicted = vit(torch.from_numpy(images)).argmax(dim=1).numpy()
    for p in vit.parameters():
        p.requires_grad_(False)  # frozen weights and an inference-mode caller still get gradient maps
    for method in ("gradient_rollout", "grad_cam"):
        with torch.inference_mode():
            assert np.array_equal(explain_map(vit, images, method, predicted), maps[method])
        other = explain_map(vit, images, method, (predicted + 1) % 7)
        assert not np.allclose(other, maps[method])
    assert np.array_equal(explain_map(vit, images, "rollout", (predicted + 1) % 7), maps["rollout"])  # no class


def test_an_unknown_method_is_a_clear_error(vit):
    with pytest.raises(ExplainError, match="unknown explanation method 'lime'; choose one of rollout, "):
        explain_map(vit, np.zeros((1, 32, 32, 3), np.uint8), "lime")


def test_the_gallery_shows_per_class_the_most_confident_right_and_wrong():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.full((5, 7), 0.01)
    probs[np.arange(5), [0, 0, 1, 1, 2]] = [0.6, 0.9, 0.8, 0.7, 0.95]
    assert gallery_picks(labels, probs) == [(1, "right"), (2, "wrong"), (3, "right"), (4, "wrong")]


def test_a_model_without_attention_blocks_is_a_clear_error(vit):
    assert check_explainable(Probabilities(vit)) is vit
    resnet = build_model(ModelParams(name="resnet10t", pretrained=False), 32)
    with pytest.raises(ExplainError, match="attention maps need a timm ViT.*--checkpoint models/best.pt"):
        check_explainable(Probabilities(resnet))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    exported = torch.export.export(Probabilities(vit).eval(), (images,)).module()  # what MLflow serves
    with pytest.raises(ExplainError, match="--checkpoint models/best.pt"):
        check_explainable(exported)
