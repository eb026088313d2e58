"""Classify image files with the champion model (or a model URI or checkpoint) into an ISIC 2018 Task 3 CSV."""

from __future__ import annotations

import sys
from pathlib import Path

from src import cli
from src.learn.inference import load_from_checkpoint, predict_files
from src.tracking.models import load_from_mlflow


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Classify images with the champion model; writes an ISIC 2018 Task 3 submission CSV.")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", help="MLflow model URI (default: models:/<tracking.registered_model>@champion)")
    group.add_argument("--checkpoint", type=Path, help="a train checkpoint such as models/best.pt instead of MLflow")
    args = p.parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        if args.checkpoint:
            model, size = load_from_checkpoint(args.checkpoint)
        else:
            from src.tracking.runs import tracking_uri

            uri = args.model or f"models:/{params.tracking.registered_model}@champion"
            model, size = load_from_mlflow(uri, tracking_uri(params.tracking))
        failed = predict_files(args.inputs, args.output, model, size)
        print(args.output)
        return 2 if failed else 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
