"""Explanation maps: where a ViT looked, by one of four methods chosen by name (METHODS).

- `rollout` (Abnar & Zuidema, 2020) follows the class token's attention down through every block (heads averaged,
  the residual path added as an identity): which patches the class token's final state was built from.
- `rollout_max` is the same with the heads fused by their maximum and the weakest 90% of each block's attention
  dropped (Gildenblat's vit-explain), which keeps the few background tokens that collect global information from
  filling the map.
- `gradient_rollout` (Chefer et al., 2021) weighs each block's attention by its gradient for the explained class
  (positive part, heads averaged) and accumulates it, R = R + A R: a map of that class, not of all of them.
- `grad_cam` (Selvaraju et al., 2017, as pytorch-grad-cam applies it to ViTs) weighs the last block's patch tokens
  (its first norm's output) by the mean gradient of the class per channel.

All work for any timm ViT with a class token and need no extra package. A map shows where the model drew on, not
why it decided: a research aid, not a diagnostic one. `src.faithfulness` measures which one points at what the
prediction needs, and DEFAULT_METHOD is the one the gallery, `predict --explain` and the demo page draw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import UserError
from src.learn.model import Classifier

METHODS = {
    "rollout": "attention rollout",
    "rollout_max": "attention rollout (max-fused heads, weakest 90% dropped)",
    "gradient_rollout": "gradient-weighted attention rollout",
    "grad_cam": "Grad-CAM on the last block",
}
# the most faithful on a 128 px ViT-Tiny (python -m src.faithfulness, 100 test images): deletion AUC 0.388 and
# insertion AUC 0.618, against rollout's 0.453 and 0.548 (docs/predicting.md, "Where the model looked")
DEFAULT_METHOD = "gradient_rollout"
DISCARD_RATIO = 0.9  # rollout_max: vit-explain's setting for ViTs fine-tuned on ImageNet


class ExplainError(UserError, ValueError):
    """A model these maps cannot explain, or a method that does not exist."""


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
def recorded_attention(classifier: Classifier, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """The attention probabilities of every block during a forward pass, (N, heads, tokens, tokens) each; with
    `detach=False` they stay in the autograd graph, for gradients with respect to them.

    Fused attention (scaled_dot_product_attention) never forms them, so the blocks run timm's explicit path
    while recording; the attention dropout module sees them, in eval mode as an identity.
    """
    records: list[torch.Tensor] = []
    blocks = _blocks(classifier)
    fused = [b.attn.fused_attn for b in blocks]
    hooks = [
        b.attn.attn_drop.register_forward_hook(lambda m, i, out: records.append(out.detach() if detach else out))
        for b in blocks
    ]
    for block in blocks:
        block.attn.fused_attn = False
    try:
        yield records
    finally:
        for block, was in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was
        for hook in hooks:
            hook.remove()


def explain_map(
    classifier: Classifier, images: np.ndarray, method: str = DEFAULT_METHOD, classes: np.ndarray | None = None
) -> np.ndarray:
    """Per uint8 (S, S, 3) image an (S, S) map in [0, 1] by the named method (METHODS); the gradient methods
    explain `classes` (one per image; default: the class the classifier predicts)."""
    if method not in METHODS:
        raise ExplainError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    classifier.eval()
    _blocks(classifier)
    if method in ("rollout", "rollout_max"):
        with torch.inference_mode():
            scores = _rollout_scores(classifier, images, "mean" if method == "rollout" else "max")
    else:
        scores = _gradient_scores(classifier, images, method, classes)
    return _to_pixels(classifier.backbone, scores, images.shape[1])


def attention_rollout(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """Per uint8 (S, S, 3) image, an (S, S) map in [0, 1]: how much each location fed the class token."""
    return explain_map(classifier, images, "rollout")


def _rollout_scores(classifier: Classifier, images: np.ndarray, fusion: str) -> torch.Tensor:
    """(N, tokens): the class token's row of the attention rollout, heads fused by mean or max."""
    device = next(classifier.parameters()).device
    with recorded_attention(classifier) as records:
        classifier(torch.from_numpy(images).to(device))
    rollout = None
    for attn in records:
        a = attn.float().cpu()
        a = a.mean(dim=1) if fusion == "mean" else _discard_weakest(a.amax(dim=1), DISCARD_RATIO)
        a = a + torch.eye(a.shape[-1])  # the residual connection carries each token's own state forward
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0]


def _discard_weakest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, T, T) with each image's weakest `ratio` of entries set to 0, the class token's attention to itself kept."""
    flat = a.flatten(1).clone()
    weakest = flat.topk(int(flat.shape[1] * ratio), dim=1, largest=False).indices
    kept = flat[:, 0].clone()
    flat.scatter_(1, weakest, 0.0)
    flat[:, 0] = kept
    return flat.view_as(a)


def _gradient_scores(
    classifier: Classifier, images: np.ndarray, method: str, classes: np.ndarray | None
) -> torch.Tensor:
    """(N, tokens) scores of the gradient methods for the explained class of each image."""
    device = next(classifier.parameters()).device
    backbone = classifier.backbone
    # the patch tokens get a gradient even when the weights are frozen or the caller runs under inference mode
    grad_from = backbone.patch_embed.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    tokens: list[torch.Tensor] = []
    last = backbone.blocks[-1].norm1.register_forward_hook(lambda m, i, out: tokens.append(out))
    try:
        with torch.inference_mode(False), torch.enable_grad(), recorded_attention(classifier, detach=False) as attn:
            logits = classifier(torch.from_numpy(np.array(images)).to(device)).float()
            chosen = logits.argmax(dim=1) if classes is None else torch.as_tensor(classes, device=device)
            target = logits.gather(1, chosen.long().view(-1, 1)).sum()  # images are independent: one backward
            if method == "grad_cam":
                (grad,) = torch.autograd.grad(target, tokens)
                return _grad_cam(tokens[0].detach(), grad, backbone)
            grads = torch.autograd.grad(target, attn)
            return _gradient_rollout([a.detach() for a in attn], grads)
    finally:
        grad_from.remove()
        last.remove()


def _gradient_rollout(attn: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Chefer et al. (2021), eq. 5-6 for self-attention: R = I, then R = R + mean_heads((dA * A)+) R per block."""
    relevance = None
    for a, g in zip(attn, grads, strict=True):
        weighted = (g.float() * a.float()).clamp_min(0).mean(dim=1).cpu()
        if relevance is None:
            relevance = torch.eye(weighted.shape[-1]).expand_as(weighted)
        relevance = relevance + weighted @ relevance
    return relevance[:, 0]


def _grad_cam(tokens: torch.Tensor, grad: torch.Tensor, backbone) -> torch.Tensor:
    """ReLU of the channel-weighted patch tokens; the weights are the gradient's mean over the patches."""
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    weights = grad[:, prefix:].float().mean(dim=1, keepdim=True)
    cam = (weights * tokens[:, prefix:].float()).sum(dim=-1).clamp_min(0).cpu()
    return torch.cat([torch.zeros(len(cam), prefix), cam], dim=1)  # the prefix tokens' places, dropped below


def _to_pixels(backbone, scores: torch.Tensor, size: int) -> np.ndarray:
    """(N, tokens) scores -> (N, size, size) maps in [0, 1]: the patch tokens on their grid, upsampled."""
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    grid = tuple(backbone.patch_embed.grid_size)
    patches = scores[:, prefix:].float().reshape(-1, 1, *grid)
    maps = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
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
    served: torch.nn.Module, files: list, size: int, batch_size: int = 32, method: str = DEFAULT_METHOD
) -> Iterator[tuple[list, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch of readable files: the files, their pixels, maps of the served prediction and its probabilities."""
    from src.learn.inference import batches  # inference imports this module's users; import late
    from src.learn.triage import split_output

    classifier = check_explainable(served)
    for ok, images, _ in batches(files, size, batch_size):
        if ok:
            with torch.inference_mode():
                probs = split_output(served(torch.from_numpy(images)).float().numpy())[0]
            yield ok, images, explain_map(classifier, images, method, probs.argmax(axis=1)), probs


def check_explainable(served: torch.nn.Module) -> Classifier:
    """The ViT inside a served model, or an ExplainError saying what to pass instead (before any work is done)."""
    classifier = getattr(served, "classifier", served)
    _blocks(classifier)
    return classifier
