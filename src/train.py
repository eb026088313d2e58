"""Stage `train`: fit the ViT on the split cache, checkpoint and resume, track the run in MLflow."""

from __future__ import annotations

from src import cli
from src.tracking.train_run import train


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("Train the classifier on the split cache (resumes an interrupted run).").parse_args(argv)
    return cli.run_main(lambda: train(cli.load(args)) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
