"""Training and evaluation loops in plain torch: no tracking or tuning imports (they hook in via callbacks)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src.config import TrainParams
from src.errors import UserError
from src.learn.checkpoint import save_checkpoint
from src.learn.metrics import summary_metrics

log = logging.getLogger(__name__)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "register_tokens")
EpochCallback = Callable[[int, dict[str, float]], None]


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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the same loop body runs unchanged under a null context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, or position/class tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, train: TrainParams, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, fused=device.type == "cuda")


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def l1_penalty(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Sum of |w| over the decayed (weight-matrix) group."""
    return sum(p.abs().sum() for p in optimizer.param_groups[0]["params"])


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
) -> dict:
    """One pass over the loader; returns mean loss, mean pre-clip gradient norm and images/s."""
    model.train()
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no per-step sync
    norm_sum = torch.zeros((), device=device)
    seen, updates, start = 0, 0, time.perf_counter()
    n_batches = len(loader)
    for i, (images, labels) in enumerate(tqdm(loader, desc=desc, leave=False, mininterval=2)):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device):
            loss = loss_fn(model(images), labels)
        total = loss + train.l1 * l1_penalty(optimizer) if train.l1 else loss
        (total / train.grad_accum_steps).backward()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        if (i + 1) % train.grad_accum_steps == 0 or i + 1 == n_batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(sched.step, sched.total_steps, sched.warmup_steps, train.lr, train.min_lr)
            norm_sum += clip_gradients(model, train)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sched.step += 1
            updates += 1
    mean_loss = (loss_sum / max(seen, 1)).item()
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training loss is {mean_loss}; lower train.lr or enable train.clip_grad_norm")
    return {
        "train/loss": mean_loss,
        "train/grad_norm": (norm_sum / max(updates, 1)).item(),
        "train/images_per_s": seen / (time.perf_counter() - start),
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels for every sample of the loader, in order."""
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        with autocast(device):
            logits = model(images.to(device, non_blocking=True))
        probs.append(logits.float().softmax(dim=-1))
        labels.append(y)
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, prefix: str = "val") -> dict[str, float]:
    """Loss, accuracy and balanced accuracy on a loader."""
    probs, labels = predict(model, loader, device)
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

    def as_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }


@dataclass(frozen=True)
class FitResult:
    best_metrics: dict[str, float]
    history: list[dict]
    best_epoch: int
    stopped_early: bool


def _loss_fn(train: TrainParams, class_weight: torch.Tensor | None) -> nn.Module:
    return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=train.label_smoothing)


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
) -> FitResult:
    """Train with early stopping on val balanced accuracy; checkpoint last/best each epoch.

    `resume` is a last.pt checkpoint to continue from. `config` and `extra` are recorded in checkpoints.
    """
    train_loader, val_loader = loaders
    raw_model = getattr(model, "_orig_mod", model)  # torch.compile wraps; save the plain module
    optimizer = make_optimizer(raw_model, train, device)
    steps_per_epoch = math.ceil(len(train_loader) / train.grad_accum_steps)
    sched = Schedule(steps_per_epoch * train.epochs, round(steps_per_epoch * train.warmup_epochs))
    state = FitState()
    if resume is not None:
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        sched.step = resume["scheduler"]["step"]
        state = FitState.from_checkpoint(resume)
        log.info("resuming from epoch %d (best val/balanced_accuracy %.4f)", state.epoch, state.best_score)
    loss_fn = _loss_fn(train, None if class_weight is None else class_weight.to(device))
    stopped_early = False
    for epoch in range(state.epoch, train.epochs):
        if train.early_stopping_patience is not None and state.bad_epochs >= train.early_stopping_patience:
            stopped_early = True
            break
        seed_everything(train.seed * 1000 + epoch)  # per-epoch seeds make resumed runs identical
        start = time.perf_counter()
        metrics = train_one_epoch(
            model, train_loader, optimizer, loss_fn, train, sched, device, desc=f"epoch {epoch + 1}/{train.epochs}"
        )
        metrics.update(evaluate(model, val_loader, device))
        metrics["epoch_seconds"] = time.perf_counter() - start
        score = metrics["val/balanced_accuracy"]
        improved = score > state.best_score
        state.epoch, state.history = epoch + 1, [*state.history, {"epoch": epoch + 1, **metrics}]
        state.best_score, state.best_epoch = (score, epoch + 1) if improved else (state.best_score, state.best_epoch)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        log.info(
            "epoch %d/%d  loss %.4f  val/loss %.4f  val/bacc %.4f  %.0f img/s",
            epoch + 1,
            train.epochs,
            metrics["train/loss"],
            metrics["val/loss"],
            score,
            metrics["train/images_per_s"],
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
        if checkpoint_dir is not None:
            base = {
                "model": raw_model.state_dict(),
                "config": config or {},
                "metrics": metrics,
                "epoch": epoch + 1,
                **(extra or {}),
            }
            if improved:
                save_checkpoint(checkpoint_dir / "best.pt", base)
            save_checkpoint(
                checkpoint_dir / "last.pt",
                {**base, "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "fit": state.as_dict()},
            )
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    return FitResult(best, state.history, state.best_epoch, stopped_early)
