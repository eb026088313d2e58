"""Stage `evaluate`: test-set metrics (and ISIC 2018 test set when present), plots, model registry."""

from __future__ import annotations

from src import cli
from src.tracking.evaluate_run import evaluate


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("Evaluate the trained model on the test split and register it in MLflow.").parse_args(argv)
    return cli.run_main(lambda: evaluate(cli.load(args)) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
