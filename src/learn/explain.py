"""Explanation maps: where a ViT looked, by attention rollout (Abnar & Zuidema, 2020).

Rollout follows the class token's attention down through every block (heads averaged, the residual path added as
an identity), so the map says which image patches the class token's final state was built from. It needs no
gradients and no extra package, and works for any timm ViT with a class token; it shows where the model drew
information from, not why it decided, and is a research aid, not a diagnostic one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import UserError
from src.learn.model import Classifier


class ExplainError(UserError, ValueError):
    """A model that attention rollout cannot explain."""


def _blocks(classifier: Classifier) -> list:
    backbone = getattr(classifier, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    is_stack = isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList)  # an export keeps names, not layers
    if not is_stack or not all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") for b in blocks):
        raise ExplainError(
            f"{type(backbone or classifier).__name__}: attention maps need a timm ViT (a model with attention "
            "blocks); with an exported MLflow model pass --checkpoint models/best.pt instead"
        )
    if getattr(backbone, "cls_token", None) is None:
        raise ExplainError(f"{type(backbone).__name__}: attention rollout needs a class token")
    return list(blocks)


@contextmanager
def recorded_attention(classifier: Classifier) -> Iterator[list[torch.Tensor]]:
    """The attention probabilities of every block during a forward pass, (N, heads, tokens, tokens) each.

    Fused attention (scaled_dot_product_attention) never forms them, so the blocks run timm's explicit path
    while recording; the attention dropout module sees them, in eval mode as an identity.
    """
    records: list[torch.Tensor] = []
    blocks = _blocks(classifier)
    fused = [b.attn.fused_attn for b in blocks]
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, i, out: records.append(out.detach())) for b in blocks]
    for block in blocks:
        block.attn.fused_attn = False
    try:
        yield records
    finally:
        for block, was in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def attention_rollout(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """Per uint8 (S, S, 3) image, an (S, S) map in [0, 1]: how much each location fed the class token."""
    classifier.eval()
    backbone = classifier.backbone
    device = next(classifier.parameters()).device
    with recorded_attention(classifier) as records:
        classifier(torch.from_numpy(images).to(device))
    rollout = None
    for attn in records:
        a = attn.float().cpu().mean(dim=1)
        a = a + torch.eye(a.shape[-1])  # the residual connection carries each token's own state forward
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    grid = tuple(backbone.patch_embed.grid_size)
    cls_to_patches = rollout[:, 0, prefix:].reshape(-1, 1, *grid)
    size = images.shape[1]
    maps = F.interpolate(cls_to_patches, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return ((maps - low) / (high - low).clamp_min(1e-12)).numpy()


def gallery_picks(labels: np.ndarray, probs: np.ndarray) -> list[tuple[int, str]]:
    """Per true class, the most confident right prediction and the most confident wrong one: (index, "right" or
    "wrong"), classes in order. Deterministic, so two runs' galleries show comparable choices."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    picks = []
    for k in range(probs.shape[1]):
        for kind, mask in (("right", (labels == k) & (predicted == k)), ("wrong", (labels == k) & (predicted != k))):
            if mask.any():
                candidates = np.flatnonzero(mask)
                picks.append((int(candidates[np.argmax(confidence[candidates])]), kind))
    return picks


def explained_batches(
    served: torch.nn.Module, files: list, size: int, batch_size: int = 32
) -> Iterator[tuple[list, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch of readable files: the files, their pixels, attention maps and served probabilities."""
    from src.learn.inference import batches  # inference imports this module's users; import late

    classifier = check_explainable(served)
    for ok, images, _ in batches(files, size, batch_size):
        if ok:
            with torch.inference_mode():
                probs = served(torch.from_numpy(images)).float().numpy()
            yield ok, images, attention_rollout(classifier, images), probs


def check_explainable(served: torch.nn.Module) -> Classifier:
    """The ViT inside a served model, or an ExplainError saying what to pass instead (before any work is done)."""
    classifier = getattr(served, "classifier", served)
    _blocks(classifier)
    return classifier
