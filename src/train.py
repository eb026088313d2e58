"""Stage `train`: fit the ViT on the split cache, checkpoint and resume, track the run in MLflow."""

from __future__ import annotations

import sys

from src import cli
from src.config import Params
from src.learn import distributed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = cli.parser("Train the classifier on the split cache (resumes an interrupted run).").parse_args(argv)
    return cli.run_main(lambda: _train_or_launch(cli.load(args), argv))


def _train_or_launch(params: Params, argv: list[str]) -> int:
    """Train in this process, or with train.nproc > 1 start that many through torchrun (unless torchrun started
    this one: `torchrun --nnodes ... -m src.train` on several machines runs here directly)."""
    if params.train.nproc > 1 and not distributed.launched():
        return distributed.launch(params.train.nproc, argv)
    from src.tracking.train_run import train  # here: the launcher above need not import MLflow

    train(params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
