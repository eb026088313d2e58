"""Entry point `python -m src.tune`: an Optuna study over the train stage's own training code.

Trials live in an Optuna RDB storage, so a study survives Ctrl-C or kill -9 (rerun the same command to go
on) and several workers on several machines can share one study. MLflow gets a parent run per study and a
nested run per trial; the best trial's values go to tune.best_params_path (and, with --apply, params.yaml).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import optuna

from src import cli
from src.tuning.params_file import apply_to_params_file, next_command
from src.tuning.search import tune
from src.tuning.search_space import by_section


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(
        "Tune train.lr, train.weight_decay, train.clip_grad_norm and model.dropout with Optuna (bounds and "
        "per-trial budget in the tune: section of params.yaml), reusing the train stage's training code. "
        "Rerun the same command to resume an interrupted study; start it on several machines with the same "
        "--storage and --study-name to search in parallel. Writes the best trial to tune.best_params_path and "
        "logs an MLflow parent run for the study with a nested run per trial."
    )
    p.prog = "python -m src.tune"
    p.add_argument(
        "--trials",
        type=_positive(int),
        default=50,
        metavar="N",
        help="finished trials (complete, pruned or failed) the study should hold in total, counting "
        "earlier runs and other workers (default: 50)",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=None,
        metavar="SEC",
        help="start no new trial after SEC seconds (this worker only; rerun to go on)",
    )
    p.add_argument(
        "--study-name", default=None, metavar="NAME", help="Optuna study to create or join (default: tune.study_name)"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB storage URL (default: tune.storage, sqlite:///optuna.db); use a shared "
        "database such as postgresql://user:password@host/db for workers on several machines",
    )
    p.add_argument(
        "--n-jobs",
        type=_positive(int),
        default=1,
        metavar="K",
        help="trials run at once in this process, as threads sharing its device (default: 1); for "
        "several GPUs start one worker per GPU (CUDA_VISIBLE_DEVICES) instead",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="also write the best values into the --params file (train.lr, train.weight_decay, "
        "train.clip_grad_norm, model.dropout), keeping its comments",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our per-trial progress line replaces Optuna's
        study = tune(
            params,
            args.trials,
            args.timeout,
            args.study_name or params.tune.study_name,
            args.storage or params.tune.storage,
            args.n_jobs,
        )
        sections = by_section(study.best_params)
        if args.apply:
            apply_to_params_file(Path(args.params), sections)
        print(next_command(sections, args.apply))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
