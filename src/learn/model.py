"""build_model(model_params) -> a timm classifier that takes uint8 images and does its own normalisation."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import timm
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from src.config import CLASSES, ModelParams
from src.errors import UserError
from src.learn.color_constancy import shades_of_gray

log = logging.getLogger(__name__)


class ModelError(UserError, ValueError):
    """A model that cannot be built or loaded; the message says what to change."""


class Classifier(nn.Module):
    """uint8 NHWC images -> logits. Colour constancy (when asked) and normalisation live inside, so training,
    evaluation, predict and MLflow serving all preprocess identically."""

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shades_of_gray_power: float | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.shades_of_gray_power = shades_of_gray_power
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.shades_of_gray_power is not None:
            x = shades_of_gray(x, self.shades_of_gray_power)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalised(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features the classifier head reads (timm's pre-logits): what the OOD guard measures."""
        return self.backbone.forward_head(self.backbone.forward_features(self.normalised(images)), pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `features`: features then head is the same computation as forward."""
        return self.backbone.get_classifier()(features)


TTA_VIEWS = (2, 4, 8)  # the view counts whose views form a group of symmetries (see dihedral_views)


def dihedral_views(images: torch.Tensor, count: int = 8) -> list[torch.Tensor]:
    """The first `count` of the 8 flips/90-degree rotations of a NHWC batch (dermoscopy has no up or left, so all 8
    are one image), ordered so that the first 2 (identity, mirror) and the first 4 (and upside down, half turn) are
    each closed under composition: a mean over them treats no direction differently."""
    quarter = torch.rot90(images, 1, dims=(1, 2))
    views = [
        lambda: images,
        lambda: images.flip(2),
        lambda: images.flip(1),
        lambda: torch.rot90(images, 2, dims=(1, 2)),
        lambda: quarter,
        lambda: quarter.flip(2),
        lambda: quarter.flip(1),
        lambda: torch.rot90(images, 3, dims=(1, 2)),
    ]
    return [view() for view in views[:count]]


def combine_views(view_logits: torch.Tensor, temperature: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N, views, classes) logits -> probabilities: softmax(logits / temperature) averaged over the views, then the
    per-class log-offsets (softmax(log p + offset)). The served model and evaluate's numbers both come from here."""
    probs = (view_logits.float() / temperature).softmax(dim=-1).mean(dim=1)
    return (probs.clamp_min(1e-12).log() + offsets).softmax(dim=-1)


class Probabilities(nn.Module):
    """The served form: uint8 NHWC images -> class probabilities (columns in CLASSES order).

    It holds the whole decision that evaluate measured: test-time augmentation (the mean of the softmax over
    `views` of the 8 dihedral views), a temperature fitted on val (calibrated confidence) and per-class log-offsets
    fitted on val.
    Evaluate, the MLflow model, serving and predict all run this one module, so they return the same probabilities.
    """

    def __init__(
        self,
        classifier: Classifier,
        tta: bool = False,
        offsets: torch.Tensor | None = None,
        temperature: float = 1.0,
        views: int = 8,
    ):
        super().__init__()
        self.classifier = classifier
        self.tta = tta
        self.views = views if tta else 1
        offsets = torch.zeros(len(CLASSES)) if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
        self.register_buffer("offsets", offsets.clone())
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, views, classes): the logits of each view the decision averages (1 view without TTA)."""
        return self.view_outputs(images)[0]

    def view_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of each view, and the pooled features of the image as it is (view 0), from one pass."""
        views = dihedral_views(images, self.views)
        features = [self.classifier.features(v) for v in views]
        return torch.stack([self.classifier.head(f).float() for f in features], dim=1), features[0].float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return combine_views(self.view_logits(images), self.temperature, self.offsets)

    def decision(self) -> dict:
        """The rule as plain values, for checkpoints and reports."""
        return {
            "tta": self.tta,
            "tta_views": self.views,
            "temperature": round(float(self.temperature), 4),
            "offsets": [round(float(v), 4) for v in self.offsets],
        }


class AllViews(nn.Module):
    """Evaluate's one pass over a split: the logits of the first `views` dihedral views, from which the plain, TTA,
    calibrated and corrected probabilities all follow, and the pooled features of view 0 (the image as it is), which
    the OOD guard measures. One (N, views * classes + features) tensor, as engine.predict collects; `split` parts it."""

    def __init__(self, classifier: Classifier, views: int = 8):
        super().__init__()
        self.served = Probabilities(classifier, tta=True, views=views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, features = self.served.view_outputs(images)
        return torch.cat([logits.flatten(1), features], dim=1)

    def split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(view logits (N, views, classes), pooled features (N, features)) of forward's output."""
        n = self.served.views * len(CLASSES)
        return out[:, :n].reshape(len(out), self.served.views, len(CLASSES)), out[:, n:]


def _create(params: ModelParams, image_size: int, pretrained: bool, any_size: bool = False) -> nn.Module:
    kwargs: dict = {"num_classes": len(CLASSES), "drop_rate": params.dropout, "drop_path_rate": params.drop_path}
    if params.weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(params.weights)}
    if params.patch_size is not None:
        kwargs["patch_size"] = params.patch_size
    if params.patch_drop > 0:
        kwargs["patch_drop_rate"] = params.patch_drop
    sized = {"img_size": image_size, **({"dynamic_img_size": True} if any_size else {})}
    try:
        return timm.create_model(params.name, pretrained=pretrained, **sized, **kwargs)
    except TypeError:  # models without a fixed input size (CNNs) take no img_size
        pass
    try:
        return timm.create_model(params.name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise ModelError(
            f"cannot build {params.name} with these model params ({err}); "
            "model.patch_size and model.patch_drop apply to ViTs only: leave them at null and 0"
        ) from err


def use_conv_stem(backbone: nn.Module, image_size: int) -> None:
    """Replace a ViT's patchify convolution by a stack of stride-2 3x3 convolutions with the same total stride
    (Xiao et al. 2021, "Early convolutions help transformers see better"): same tokens, about the cost of one
    more block, and a ViT trained from scratch on little data learns faster and more stably with it."""
    embed = getattr(backbone, "patch_embed", None)
    patch = embed.patch_size[0] if embed is not None else 0
    if patch < 4 or patch & (patch - 1):
        raise ModelError(
            f"model.stem: conv needs a ViT whose patch size is a power of 2 >= 4 (got {type(backbone).__name__})"
        )
    depth, dim = int(math.log2(patch)), backbone.embed_dim
    channels = tuple(dim // 2 ** (depth - 1 - i) for i in range(depth))  # ViT-Tiny/16: 24, 48, 96, 192
    stem = ConvStem(depth=depth, channels=channels, stride=(2,) * depth, kernel_size=3)
    # a ViT built for any input size takes its tokens as NHWC from a lenient embedding (as timm builds its own)
    dynamic = {"output_fmt": "NHWC", "strict_img_size": False} if getattr(backbone, "dynamic_img_size", False) else {}
    backbone.patch_embed = HybridEmbed(stem, img_size=image_size, patch_size=1, embed_dim=dim, proj=False, **dynamic)


def build_model(
    params: ModelParams, image_size: int, shades_of_gray_power: float | None = None, any_size: bool = False
) -> Classifier:
    """Create the timm model named in params, with pretrained or local weights when asked, and Shades of Gray colour
    constancy of that power in front of it (`data.color_constancy`; None: off).

    `any_size` (progressive resizing) builds a ViT that also takes smaller inputs: timm's dynamic_img_size resamples
    the position embedding to each input's grid in every forward, so the parameters keep their `image_size` shapes
    (the optimizer, the EMA and checkpoints never see another size) and at `image_size` nothing is resampled."""
    if params.name not in timm.list_models(pretrained=False):
        raise ModelError(f"model.name: unknown timm model {params.name!r} (see timm.list_models())")
    if params.weights is not None and not Path(params.weights).is_file():
        raise ModelError(f"model.weights: file {params.weights} not found")
    pretrained = params.pretrained or params.weights is not None
    if params.pretrained and params.weights is None:
        log.info(
            "fetching pretrained weights for %s from the Hugging Face hub (offline? set model.weights)", params.name
        )
    try:
        backbone = _create(params, image_size, pretrained, any_size)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise ModelError(f"cannot build {params.name}: {err}") from err
        raise ModelError(
            f"could not load pretrained weights for {params.name} ({type(err).__name__}: {err}). "
            "Offline? Set model.weights: PATH to a local weights file (.safetensors/.pth from timm/HF), "
            "or model.pretrained: false to train from scratch."
        ) from err
    if params.stem == "conv":
        use_conv_stem(backbone, image_size)
    if any_size and not getattr(backbone, "dynamic_img_size", False):
        raise ModelError(
            f"train.progressive_size: {params.name} cannot take a smaller input than it was built for "
            "(only timm ViTs with dynamic_img_size can); set train.progressive_size: null"
        )
    cfg = timm.data.resolve_data_config({}, model=backbone)
    log.info(
        "built %s (%s, %.1fM params)",
        params.name,
        "pretrained" if pretrained else "random init",
        sum(p.numel() for p in backbone.parameters()) / 1e6,
    )
    return Classifier(backbone, tuple(cfg["mean"]), tuple(cfg["std"]), shades_of_gray_power)


def token_stride(model: Classifier) -> int:
    """How many input pixels make one token along a side (the patch size, or the conv stem's total stride)."""
    embed = model.backbone.patch_embed
    return embed.img_size[0] // embed.grid_size[0]


def freeze_early(model: Classifier, blocks: int) -> None:
    """Freeze a ViT's patch embedding, class/position tokens and its first `blocks` transformer blocks.

    Fine-tuning on a CPU budget: no gradient flows below block `blocks`, so its backward pass (about two thirds of
    a block's cost) is skipped for every frozen block; with layer-wise lr decay those blocks barely moved anyway.
    """
    if blocks == 0:
        return
    backbone = model.backbone
    stack = getattr(backbone, "blocks", None)
    if stack is None or not hasattr(backbone, "patch_embed"):
        raise ModelError(f"train.freeze_blocks: {type(backbone).__name__} is not a ViT with blocks; set it to 0")
    if blocks > len(stack):
        raise ModelError(f"train.freeze_blocks: {blocks} is more than the model's {len(stack)} blocks")
    for module in (backbone.patch_embed, *stack[:blocks]):
        module.requires_grad_(False)
    for name in ("cls_token", "reg_token", "pos_embed"):
        token = getattr(backbone, name, None)
        if isinstance(token, nn.Parameter):
            token.requires_grad_(False)
