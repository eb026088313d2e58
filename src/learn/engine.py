"""Training and evaluation loops in plain torch: no tracking or tuning imports (they hook in via callbacks)."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src.config import CLASSES, TrainParams
from src.errors import UserError
from src.learn import distributed
from src.learn.checkpoint import LAST_FILE, save_checkpoint
from src.learn.metrics import summary_metrics
from src.learn.precision import autocast, resolve_precision

log = logging.getLogger(__name__)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "register_tokens")
EpochCallback = Callable[[int, dict[str, float]], None]
ETA_AFTER_STEPS = 5  # optimizer steps timed, after the first, before the run's duration is estimated
CPU_HOURS_WARNING = 2.0


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


def select_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for 'auto'; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Weight decay on weight matrices only (not norms, biases, position/class tokens); with `layer_decay`,
    timm's per-block lr scales (`lr_scale`), so fine-tuning moves the pretrained early blocks least."""
    if layer_decay is not None:
        backbone = getattr(model, "backbone", model)  # timm's group_matcher lives on the timm model
        skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
        groups = param_groups_layer_decay(backbone, weight_decay, skip, layer_decay=layer_decay)
        return [{**g, "decayed": g["weight_decay"] > 0} for g in groups]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "decayed": True},
        {"params": no_decay, "weight_decay": 0.0, "decayed": False},
    ]


def make_optimizer(model: nn.Module, train: TrainParams, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, train.weight_decay, train.layer_decay)
    return torch.optim.AdamW(groups, lr=train.lr, fused=device.type == "cuda")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under the DDP and torch.compile wrappers: what the EMA follows and checkpoints save."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def l1_penalty(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Sum of |w| over the weight matrices (the groups that get weight decay)."""
    return sum(p.abs().sum() for g in optimizer.param_groups if g["decayed"] for p in g["params"])


def clip_gradients(model: nn.Module, train: TrainParams) -> torch.Tensor:
    """Clip by value, then by global norm (when set); returns the norm before norm-clipping."""
    if train.clip_grad_value is not None:
        nn.utils.clip_grad_value_(model.parameters(), train.clip_grad_value)
    max_norm = train.clip_grad_norm if train.clip_grad_norm is not None else float("inf")
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@dataclass
class Schedule:
    """Optimizer-step bookkeeping; its state is a plain dict in checkpoints."""

    total_steps: int
    warmup_steps: int
    step: int = 0
    # progressive resizing, for the estimate only: the last `final_steps` steps each cost `final_step_cost` early ones
    final_steps: int = 0
    final_step_cost: float = 1.0

    @property
    def planned_cost(self) -> float:
        """The whole run in early steps' time (all steps when every epoch trains at one size)."""
        return self.total_steps + self.final_steps * (self.final_step_cost - 1)

    def state_dict(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    train: TrainParams,
    sched: Schedule,
    device: torch.device,
    desc: str = "train",
    ema: ModelEmaV3 | None = None,
    mixer: Mixup | None = None,
) -> dict:
    """One pass over the loader; returns mean loss, mean pre-clip gradient norm and images/s.

    `mixer` (timm's Mixup) turns each batch and its labels into mixed images and soft targets; `ema` is updated
    after every optimizer step.
    """
    model.train()
    precision = resolve_precision(train.precision, device)
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no per-step sync
    norm_sum = torch.zeros((), device=device)
    seen, updates, start = 0, 0, time.perf_counter()
    first_step_end, timed_steps = start, eta_steps(loader)
    n_batches = len(loader)
    batches = tqdm(loader, desc=desc, leave=False, mininterval=2, disable=not distributed.is_main())
    for i, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        stepping = (i + 1) % train.grad_accum_steps == 0 or i + 1 == n_batches
        targets = labels
        if mixer is not None:
            images, targets = mix_batch(mixer, images, labels)
        # DDP averages gradients over the ranks in backward; between optimizer steps it need not
        with model.no_sync() if not stepping and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast(device, precision):
                loss = loss_fn(model(images), targets)
            total = loss + train.l1 * l1_penalty(optimizer) if train.l1 else loss
            (total / train.grad_accum_steps).backward()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        if stepping:
            norm_sum += optimizer_step(model, optimizer, train, sched, ema)
            updates += 1
            if updates == 1:
                first_step_end = time.perf_counter()
            # a fresh run's first step carries CUDA's start-up, kernel autotuning and the loader's workers starting
            # (6.8 s of an H100 run whose steps took 0.14 s: an 8-minute run read 1.3 h), so it is left out of the rate
            if sched.step == updates == timed_steps + 1:
                log_estimate(sched, (time.perf_counter() - first_step_end) / timed_steps, device, precision)
    # over all ranks: the mean loss of every image trained on, and the images all ranks trained on per second
    loss_sum, seen = distributed.sum_across(torch.stack([loss_sum, torch.tensor(float(seen), device=device)])).tolist()
    mean_loss = loss_sum / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training loss is {mean_loss}; lower train.lr or enable train.clip_grad_norm")
    return {
        "train/loss": mean_loss,
        "train/grad_norm": (norm_sum / max(updates, 1)).item(),  # after DDP's averaging: the same on every rank
        "train/images_per_s": seen / (time.perf_counter() - start),
        "lr": lr_at(max(sched.step - 1, 0), sched.total_steps, sched.warmup_steps, train.lr, train.min_lr),
    }


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainParams, sched: Schedule, ema: ModelEmaV3 | None
) -> torch.Tensor:
    """Set the scheduled lr (scaled per group), clip, step, advance the schedule and the EMA; the pre-clip norm."""
    lr = lr_at(sched.step, sched.total_steps, sched.warmup_steps, train.lr, train.min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    norm = clip_gradients(model, train)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sched.step += 1
    if ema is not None:
        ema.update(unwrap(model), step=sched.step)
    return norm


def eta_steps(loader) -> int:
    """Steps timed for the estimate after the first one: twice the batches the loader's workers can hold ready,
    since those made during the slow first step go at the model's speed alone (on the H100 4 steps after the first
    took 0.05 s each, the run's steps 0.14 s)."""
    prefetched = getattr(loader, "num_workers", 0) * (getattr(loader, "prefetch_factor", None) or 0)
    return max(ETA_AFTER_STEPS, 2 * prefetched)


def log_estimate(sched: Schedule, seconds_per_step: float, device: torch.device, precision: str = "fp32") -> None:
    """Say early how long the whole run will take, so nobody waits ten hours for a GPU profile on a CPU; name the
    CPU profile's resolution for this CPU (a 224 px step takes 2.7x a 128 px one; bf16 pays for that)."""
    hours = seconds_per_step * sched.planned_cost / 3600
    log.info("estimated training time: %.1f h (%.2f s per step, %d steps)", hours, seconds_per_step, sched.total_steps)
    if sched.final_steps:
        log.info(
            "progressive resizing: the last %d steps estimated at %.1fx this step (the pixel ratio); all %d steps at "
            "the final size would take about %.1f h",
            sched.final_steps,
            sched.final_step_cost,
            sched.total_steps,
            seconds_per_step * sched.final_step_cost * sched.total_steps / 3600,
        )
    if device.type == "cpu" and hours > CPU_HOURS_WARNING:
        # bf16 units are not one speed: a 2-core Zen 4 trains 224 px at 0.42 of a Zen 5's rate, over the hour
        size = (
            "224 px (this CPU trains in bf16; 128 px where that run's own estimate reads over 0.4 h, as on a Zen 4)"
            if precision == "bf16"
            else "128 px (this CPU has no native bf16)"
        )
        log.warning(
            "this profile needs about %.0f h on this CPU; on a CPU use the pretrained CPU profile (README, "
            "'Profiles': vit_tiny_patch16_224, 6 epochs at %s, about 30 min on 2 cores)",
            hours,
            size,
        )


def mix_batch(mixer: Mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/cutmix a uint8 NHWC batch: float NHWC images (a view the model normalises as usual), soft targets."""
    mixed, targets = mixer(images.permute(0, 3, 1, 2).float(), labels)
    return mixed.permute(0, 2, 3, 1), targets


def make_mixer(train: TrainParams, num_classes: int) -> Mixup | None:
    """timm's Mixup for train.mixup/cutmix > 0 (label smoothing folded into its soft targets), else None."""
    if not (train.mixup or train.cutmix):
        return None
    return Mixup(
        mixup_alpha=train.mixup,
        cutmix_alpha=train.cutmix,
        label_smoothing=train.label_smoothing,
        num_classes=num_classes,
    )


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, softmax: bool = True, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels for every sample of the loader, in order (`softmax=False` for a model
    that already returns probabilities). fp32 unless a resolved `precision` says bf16: evaluate reports what the fp32
    export serves, while training's per-epoch val runs in the precision it trains in."""
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        with autocast(device, precision):
            out = model(images.to(device, non_blocking=True)).float()
        probs.append(out.softmax(dim=-1) if softmax else out)
        labels.append(y)
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, prefix: str = "val", precision: str = "fp32"
) -> dict[str, float]:
    """Loss, accuracy and balanced accuracy on a loader (data-parallel: on every rank's part of the split together,
    so that all ranks see the same numbers and take the same keep/stop decisions)."""
    probs, labels = predict(model, loader, device, precision=precision)
    probs, labels = distributed.gather_rows(probs), distributed.gather_rows(labels)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()
    return {f"{prefix}/{k}": v for k, v in {"loss": float(nll), **summary_metrics(labels, probs)}.items()}


@dataclass
class FitState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> FitState:
        return cls(**ckpt["fit"])

    def record(self, epoch: int, metrics: dict[str, float], candidate: bool = True) -> bool:
        """Add an epoch's metrics; True when its val/score is the best so far. An epoch that is no `candidate`
        (progressive resizing's early epochs, validated at another size) neither improves nor counts as bad."""
        self.epoch, self.history = epoch, [*self.history, {"epoch": epoch, **metrics}]
        if not candidate:
            return False
        score = metrics["val/score"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved

    def as_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }


@dataclass(frozen=True)
class Progressive:
    """Progressive resizing: the first `epochs` epochs train and validate on `loaders`, at `size` px, and the rest
    on fit's own loaders at `final_size`. Only the final-size epochs are candidates for the kept weights and count
    for early stopping: evaluate and serving run at the final size, and a score at another size ranks nothing there."""

    loaders: tuple[DataLoader, DataLoader]
    size: int
    final_size: int
    epochs: int

    def image_size(self, early: bool) -> dict[str, float]:
        """The epoch's resolution, as a metric."""
        return {"train/image_size": self.size if early else self.final_size}

    def plan(self, sched: Schedule, steps_per_epoch: int, total_epochs: int) -> int:
        """Tell the schedule which steps run at the final size and their cost (tokens grow with the pixels); the
        number of early epochs."""
        sched.final_steps = steps_per_epoch * (total_epochs - self.epochs)
        sched.final_step_cost = (self.final_size / self.size) ** 2
        return self.epochs


@dataclass(frozen=True)
class FitResult:
    best_metrics: dict[str, float]
    history: list[dict]
    best_epoch: int
    stopped_early: bool


def _loss_fn(train: TrainParams, class_weight: torch.Tensor | None, mixing: bool) -> nn.Module:
    if mixing:  # soft targets from Mixup already carry the label smoothing
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=train.label_smoothing)


def make_ema(model: nn.Module, train: TrainParams) -> ModelEmaV3 | None:
    """timm's weight EMA with its warm-up (short fine-tuning runs have few steps), or None when off."""
    return None if train.ema_decay is None else ModelEmaV3(model, decay=train.ema_decay, use_warmup=True)


def validate(
    model: nn.Module, ema: ModelEmaV3 | None, loader: DataLoader, device: torch.device, precision: str = "fp32"
) -> tuple[dict[str, float], str]:
    """Val metrics of the raw weights (val/) and of the EMA (val_ema/); `val/score` is the better balanced
    accuracy, and the second value says which weights gave it ("raw" or "ema").

    Training passes its own resolved precision: on a CPU with bf16 units ViT-Tiny's inference at 224 px runs at 2.4
    times the fp32 rate (127 against 54 img/s on a Zen 5), and in fp32 the two passes over val took a quarter of a
    224 px profile's epoch (3.8 min; 3.3 in bf16). It only ranks epochs: evaluate scores the kept weights in fp32."""
    metrics = evaluate(model, loader, device, precision=precision)
    score, weights = metrics["val/balanced_accuracy"], "raw"
    if ema is not None:
        metrics |= evaluate(ema.module, loader, device, prefix="val_ema", precision=precision)
        if metrics["val_ema/balanced_accuracy"] > score:
            score, weights = metrics["val_ema/balanced_accuracy"], "ema"
    return {**metrics, "val/score": score}, weights


@dataclass
class Learner:
    """What updates the weights: optimizer, schedule, loss and the optional EMA and mixup."""

    optimizer: torch.optim.Optimizer
    sched: Schedule
    loss_fn: nn.Module
    ema: ModelEmaV3 | None
    mixer: Mixup | None

    def restore(self, model: nn.Module, resume: dict) -> FitState:
        model.load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.sched.step = resume["scheduler"]["step"]
        if self.ema is not None:
            self.ema.module.load_state_dict(resume["ema"])
        state = FitState.from_checkpoint(resume)
        log.info("resuming from epoch %d (best val/score %.4f)", state.epoch, state.best_score)
        return state

    def checkpoints(self, model: nn.Module, weights: str, base: dict, state: FitState) -> tuple[dict, dict]:
        """(best, last) checkpoint dicts: best holds the weights that scored, last everything to resume."""
        chosen = self.ema.module if weights == "ema" else model
        best = {**base, "model": chosen.state_dict(), "weights": weights}
        last = {
            **base,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict(),
            "fit": state.as_dict(),
        }
        if self.ema is not None:
            last["ema"] = self.ema.module.state_dict()
        return best, last


def make_learner(
    model: nn.Module, train: TrainParams, device: torch.device, steps_per_epoch: int, class_weight: torch.Tensor | None
) -> Learner:
    """Optimizer (layer-decayed when asked), warm-up + cosine schedule, loss, EMA and mixup for `fit`."""
    sched = Schedule(steps_per_epoch * train.epochs, round(steps_per_epoch * train.warmup_epochs))
    mixer = make_mixer(train, len(CLASSES))
    weight = None if class_weight is None else class_weight.to(device)
    return Learner(
        make_optimizer(model, train, device),
        sched,
        _loss_fn(train, weight, mixer is not None),
        make_ema(model, train),
        mixer,
    )


def _log_epoch(epoch: int, train: TrainParams, metrics: dict[str, float]) -> None:
    log.info(
        "epoch %d/%d  loss %.4f  val/loss %.4f  val/bacc %.4f%s  %.0f img/s%s",
        epoch,
        train.epochs,
        metrics["train/loss"],
        metrics["val/loss"],
        metrics["val/balanced_accuracy"],
        f"  ema {metrics['val_ema/balanced_accuracy']:.4f}" if "val_ema/balanced_accuracy" in metrics else "",
        metrics["train/images_per_s"],
        f"  at {metrics['train/image_size']:.0f} px" if "train/image_size" in metrics else "",
    )


def save_epoch(checkpoint_dir: Path, best: dict, last: dict, improved: bool) -> None:
    """last.pt after every epoch (what a stopped run resumes from), best.pt when the epoch is the best so far."""
    if improved:
        save_checkpoint(checkpoint_dir / "best.pt", best)
    save_checkpoint(checkpoint_dir / LAST_FILE, last)


def fit(
    model: nn.Module,
    loaders: tuple[DataLoader, DataLoader],
    train: TrainParams,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    config: dict | None = None,
    resume: dict | None = None,
    on_epoch_end: EpochCallback | None = None,
    class_weight: torch.Tensor | None = None,
    extra: dict | None = None,
    progressive: Progressive | None = None,
) -> FitResult:
    """Train with early stopping on val/score (balanced accuracy, raw or EMA); checkpoint last/best each epoch.

    `resume` is a last.pt checkpoint to continue from. `config` and `extra` are recorded in checkpoints.
    `progressive` gives the loaders of the early epochs at a lower resolution.
    """
    # DDP wraps the (possibly compiled) model: evaluate without it (its forward syncs buffers across ranks, and the
    # ranks' val parts may differ by a batch); torch.compile wraps the plain module, which checkpoints save
    local_model = model.module if isinstance(model, DistributedDataParallel) else model
    raw_model = unwrap(model)
    steps_per_epoch = math.ceil(len(loaders[0]) / train.grad_accum_steps)
    learner = make_learner(raw_model, train, device, steps_per_epoch, class_weight)
    early_epochs = 0 if progressive is None else progressive.plan(learner.sched, steps_per_epoch, train.epochs)
    state = FitState() if resume is None else learner.restore(raw_model, resume)
    precision = resolve_precision(train.precision, device)  # validation's too: it only ranks epochs
    stopped_early = False
    for epoch in range(state.epoch, train.epochs):
        if train.early_stopping_patience is not None and state.bad_epochs >= train.early_stopping_patience:
            stopped_early = True
            break
        seed_everything(train.seed * 1000 + epoch)  # per-epoch seeds make resumed runs identical
        early = epoch < early_epochs
        epoch_train, epoch_val = progressive.loaders if early else loaders
        start = time.perf_counter()
        metrics = train_one_epoch(
            model,
            epoch_train,
            learner.optimizer,
            learner.loss_fn,
            train,
            learner.sched,
            device,
            desc=f"epoch {epoch + 1}/{train.epochs}",
            ema=learner.ema,
            mixer=learner.mixer,
        )
        val_metrics, weights = validate(local_model, learner.ema, epoch_val, device, precision)
        metrics |= val_metrics | {"epoch_seconds": time.perf_counter() - start}
        metrics |= {} if progressive is None else progressive.image_size(early)
        improved = state.record(epoch + 1, metrics, candidate=not early)
        _log_epoch(epoch + 1, train, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
        if checkpoint_dir is not None:
            base = {"config": config or {}, "metrics": metrics, "epoch": epoch + 1, **(extra or {})}
            save_epoch(checkpoint_dir, *learner.checkpoints(raw_model, weights, base, state), improved)
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    return FitResult(best, state.history, state.best_epoch, stopped_early)
