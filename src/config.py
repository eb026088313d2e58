"""Typed params: one pydantic model per params.yaml section; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from src.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
Source = Literal["kaggle", "isic", "dataverse", "local", "synthetic"]


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the file, key and allowed values."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(Section):
    raw: Path = Path("data/raw")
    downloads: Path = Path("data/downloads")
    splits: Path = Path("data/splits")
    cache: Path = Path("data/cache")
    models: Path = Path("models")
    reports: Path = Path("reports")


class DataParams(Section):
    source: Source = "dataverse"  # public, no account needed; Kaggle wants an API token
    local_path: Path | None = None
    isic2018_test: bool = False
    image_size: int = Field(224, ge=16, le=1024)
    drop_unreadable: bool = False
    color_constancy: Literal["none", "shades_of_gray"] = Field(
        "none", description="remove each image's colour cast in the model's input layer (train and every inference)"
    )
    color_constancy_power: float = Field(
        6.0, ge=1, le=32, description="Shades of Gray's Minkowski norm p: 1 = grey world, large = max-RGB"
    )
    synthetic_lesions: int = Field(240, ge=14)
    kaggle_url: str = "https://www.kaggle.com/api/v1"
    kaggle_dataset: str = "kmader/skin-cancer-mnist-ham10000"
    isic_url: str = "https://isic-challenge-data.s3.amazonaws.com/2018"
    dataverse_url: str = "https://dataverse.harvard.edu"
    dataverse_doi: str = "doi:10.7910/DVN/DBW86T"
    timeout_s: float = Field(30.0, gt=0)

    @property
    def shades_of_gray_power(self) -> float | None:
        """The power the model's colour constancy uses, None when it is off."""
        return self.color_constancy_power if self.color_constancy == "shades_of_gray" else None

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataParams:
        if self.source == "local" and self.local_path is None:
            raise ValueError("data.source 'local' needs data.local_path (a folder or an archive of HAM10000)")
        return self


class SplitParams(Section):
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 42
    duplicate_max_distance: int = Field(
        6,
        ge=0,
        le=64,
        description="perceptual-hash Hamming radius for copy candidates (each confirmed by a detail check)",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"split.val_fraction + split.test_fraction = {self.val_fraction + self.test_fraction:.2f}; "
                "they must sum to less than 0.9 so that training keeps data (train gets the rest)"
            )
        return self


class ModelParams(Section):
    name: str = "deit_small_patch16_224"
    pretrained: bool = True
    weights: Path | None = None
    dropout: float = Field(0.1, ge=0, lt=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    patch_size: int | None = Field(None, ge=2, description="override the model's patch size (from-scratch only)")
    stem: Literal["patch", "conv"] = Field(
        "patch", description="ViT patch embedding: one strided conv (patch) or stride-2 3x3 convs (from scratch)"
    )
    patch_drop: float = Field(
        0.0, ge=0, lt=1, description="ViT: fraction of patch tokens dropped at random in training (PatchDropout)"
    )

    @model_validator(mode="after")
    def _conv_stem_from_scratch(self) -> ModelParams:
        if self.stem == "conv" and (self.pretrained or self.weights is not None):
            raise ValueError(
                "model.stem: conv replaces the patch embedding that pretrained weights were trained with; "
                "use it with model.pretrained: false and no model.weights, or set model.stem: patch"
            )
        return self


class AugmentParams(Section):
    flips: bool = True
    rot90: bool = True
    scale_min: float = Field(0.75, gt=0, le=1, description="smallest crop area fraction of RandomResizedCrop")
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    saturation: float = Field(0.1, ge=0, le=1)
    hue: float = Field(0.02, ge=0, le=0.5)
    policy: Literal["none", "trivial", "randaugment"] = Field(
        "none", description="torchvision TrivialAugmentWide or RandAugment before the flips (from-scratch recipe)"
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of erasing one random rectangle")
    # acquisition shifts (another device, its optics and its files); see the shift report in evaluate
    color_cast: float = Field(
        0.0, ge=0, le=1, description="white balance: channel log-gains up to this, in a random chromatic direction"
    )
    gamma: float = Field(0.0, ge=0, le=1, description="tone curve: gamma exp(u), u uniform in [-gamma, gamma]")
    blur: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur, sigma up to 2% of the side")
    noise: float = Field(0.0, ge=0, le=1, description="probability of Gaussian sensor noise, sigma up to 20 levels")
    jpeg: float = Field(0.0, ge=0, le=1, description="probability of a JPEG round trip at quality 20-95")
    hair: float = Field(0.0, ge=0, le=1, description="probability of drawing 1-12 synthetic hairs")


class TrainParams(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    l1: float = Field(0.0, ge=0, description="L1 penalty on weights (not norms/biases/tokens)")
    clip_grad_norm: float | None = Field(1.0, gt=0)
    clip_grad_value: float | None = Field(None, gt=0)
    warmup_epochs: float = Field(2.0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    grad_accum_steps: int = Field(1, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    sampler: Literal["none", "balanced", "sqrt"] = "balanced"
    class_weights: Literal["none", "balanced", "sqrt"] = "none"
    early_stopping_patience: int | None = Field(10, ge=1)
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay for fine-tuning: block k of n gets lr * decay^(n - k)"
    )
    freeze_blocks: int = Field(
        0, ge=0, description="fine-tuning: freeze the patch embedding and the first N ViT blocks (no backward there)"
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an EMA of the weights; each epoch the better of EMA and raw on val is kept"
    )
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 = off); label smoothing is folded into its targets")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0 = off)")
    train_fraction: float = Field(1.0, gt=0, le=1, description="use a lesion-stratified fraction (tuning)")
    augment: AugmentParams = AugmentParams()
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training compute: auto = bf16 where the device has native bf16 (CUDA, AMX/AVX512-BF16)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads per process; null = the cores shared out")
    nproc: int = Field(
        1, ge=1, description="data-parallel processes on this machine (torchrun + DDP); train.batch_size stays global"
    )
    num_workers: int | None = Field(None, ge=0, description="loader workers; null = chosen for the device")
    channels_last: bool = False
    compile: bool = False
    seed: int = 42
    progressive_size: int | None = Field(
        None,
        ge=16,
        description="progressive resizing: the resolution of the early epochs (< data.image_size); null = off",
    )
    progressive_final_epochs: int = Field(
        1, ge=1, description="progressive resizing: how many last epochs train at data.image_size"
    )

    @model_validator(mode="after")
    def _final_epochs_leave_early_ones(self) -> TrainParams:
        if self.progressive_size is not None and self.progressive_final_epochs >= self.epochs:
            raise ValueError(
                f"train.progressive_final_epochs ({self.progressive_final_epochs}) must be below train.epochs "
                f"({self.epochs}) so that some epochs train at train.progressive_size"
            )
        return self

    @model_validator(mode="after")
    def _mixup_without_class_weights(self) -> TrainParams:
        if (self.mixup or self.cutmix) and self.class_weights != "none":
            raise ValueError("train.class_weights works without mixup/cutmix only; balance with train.sampler")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ValueError(f"train.batch_size must be even for mixup/cutmix (got {self.batch_size})")
        return self


class EvaluateParams(Section):
    promote_metric: str = Field(
        "val_served/balanced_accuracy",
        description="what a new version must beat the champion on: val_served/... (the served model on val: "
        "models are chosen on val) or test/...",
    )
    batch_size: int = Field(128, ge=1)
    tta: bool | Literal["auto"] = Field(
        "auto", description="average probabilities over the 8 flips/rotations; auto = when it helps on val"
    )
    tta_views: Literal[2, 4, 8] = Field(
        8,
        description="how many of the 8 flips/rotations TTA averages (2: and the mirror image; 4: and upside down); "
        "evaluate's passes over val and test cost about this many times one view",
    )
    prior_correction: bool = Field(
        False, description="per-class logit offsets fitted on val for balanced accuracy, stored with the model"
    )
    calibrate: bool | Literal["auto"] = Field(
        "auto",
        description="temperature scaling fitted on val (NLL), stored with the model; auto = when it lowers val ECE",
    )
    shift: bool = Field(True, description="the shift report: val and test scored under acquisition shifts")
    shift_per_class: int = Field(
        40, ge=1, description="shift report: at most this many lesions per class (one image each) per split"
    )
    referral_target: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="referral rule: the balanced accuracy that the decided cases must reach on val; the others are "
        "referred (null: none referred)",
    )
    ood_keep: float | None = Field(
        0.95,
        gt=0,
        lt=1,
        description="OOD guard: the share of val images its threshold keeps as in distribution (null: no guard)",
    )


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "hmnist-vit"
    registered_model: str = "hmnist-vit"
    log_model: bool = True


class TuneParams(Section):
    lr: tuple[float, float] = (1e-5, 3e-3)
    weight_decay: tuple[float, float] = (1e-4, 0.3)
    dropout: tuple[float, float] = (0.0, 0.5)
    clip_grad_norm: tuple[float, float] = (0.1, 10.0)
    epochs: int = Field(16, ge=1)
    train_fraction: float = Field(0.25, gt=0, le=1)
    image_size: int | None = Field(None, ge=16)
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = "successive_halving"
    reduction_factor: int = Field(4, ge=2)
    warmup_epochs_before_pruning: int = Field(1, ge=0)
    seed: int = 42
    storage: str = "sqlite:///optuna.db"
    study_name: str = "hmnist-vit-tune"
    best_params_path: Path = Path("tune/best_params.yaml")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> TuneParams:
        for key in ("lr", "weight_decay", "dropout", "clip_grad_norm"):
            low, high = getattr(self, key)
            if not low < high:
                raise ValueError(f"tune.{key}: lower bound {low} must be below upper bound {high}")
            if key != "dropout" and low <= 0:
                raise ValueError(f"tune.{key}: bounds are searched on a log scale and must be > 0, got {low}")
            if key == "dropout" and not (low >= 0 and high < 1):
                raise ValueError(f"tune.dropout: bounds must lie in [0, 1), got [{low}, {high}]")
        return self


class Params(Section):
    paths: PathsParams = PathsParams()
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _progressive_below_final_size(self) -> Params:
        low = self.train.progressive_size
        if low is not None and low >= self.data.image_size:
            raise ValueError(
                f"train.progressive_size ({low}) must be below data.image_size ({self.data.image_size}), the "
                "resolution of the last epochs; set it lower or to null"
            )
        return self


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid params"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = e["loc"][:-1]
            model = Params
            for part in section:
                model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
            allowed = ", ".join(model.model_fields) if isinstance(model, type) else "?"
            msg = f"unknown key (allowed here: {allowed})"
        elif "input" in e and e["type"] != "value_error":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key or '<top>'}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, path: Path = DEFAULT_PARAMS) -> Params:
    """Validate a params mapping; errors name the file and each bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, path)


def apply_overrides(params: Params, overrides: list[str]) -> Params:
    """Apply `section.key=value` overrides (values parsed as YAML), like `dvc exp run -S`."""
    raw = params.model_dump(mode="json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=0.001")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return parse_params(raw, Path("<overrides>"))


def flatten(params: Params) -> dict[str, object]:
    """Params as flat `section.key` pairs (for MLflow)."""
    out: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", params.model_dump(mode="json"))
    return out
