"""The tuning search space, in one place: what is searched, on which scale, and where it lands in Params."""

from __future__ import annotations

from pathlib import Path

import optuna

from src.config import Params, TuneParams, parse_params

# name -> (params.yaml section it belongs to, searched on a log scale); bounds come from the `tune:` section.
SPACE: dict[str, tuple[str, bool]] = {
    "lr": ("train", True),
    "weight_decay": ("train", True),
    "dropout": ("model", False),
    "clip_grad_norm": ("train", True),
}


def suggest(trial: optuna.Trial, space: TuneParams) -> dict[str, float]:
    """One point of the search space as plain numbers (the model is built from these, never from the trial)."""
    return {name: trial.suggest_float(name, *getattr(space, name), log=log) for name, (_, log) in SPACE.items()}


def by_section(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Searched values grouped as they appear in params.yaml: {'train': {...}, 'model': {...}}."""
    sections: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        sections.setdefault(SPACE[name][0], {})[name] = value
    return sections


def trial_params(base: Params, values: dict[str, float], tune: TuneParams) -> Params:
    """`base` with a trial's values and the per-trial budget applied.

    Early stopping is off inside a trial: the pruner decides when a trial stops, and every trial that
    survives gets the same number of epochs, so their best scores compare fairly.
    """
    sections = by_section(values)
    budget = {"epochs": tune.epochs, "train_fraction": tune.train_fraction, "early_stopping_patience": None}
    sections["train"] = {**sections.get("train", {}), **budget}
    return base.model_copy(update={name: getattr(base, name).model_copy(update=u) for name, u in sections.items()})


def check_space(base: Params) -> None:
    """Both corners of the search space must be valid params, so a bad bound fails now and not at trial 37."""
    for corner, label in ((0, "lower"), (1, "upper")):
        values = {name: getattr(base.tune, name)[corner] for name in SPACE}
        raw = trial_params(base, values, base.tune).model_dump(mode="json")
        parse_params(raw, Path(f"tune search space ({label} bounds {values})"))
