"""Classify image files with the champion model (or a model URI or checkpoint) into an ISIC 2018 Task 3 CSV, with
the served triage flags: which cases to refer, and which inputs look like no dermoscopy image the model knows."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from src import cli
from src.learn.inference import find_images, load_from_checkpoint, predict_files
from src.learn.precision import PRECISIONS, autocast, resolve_precision
from src.tracking.models import load_from_mlflow


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Classify images with the champion model; writes an ISIC 2018 Task 3 submission CSV.")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", help="MLflow model URI (default: models:/<tracking.registered_model>@champion)")
    group.add_argument("--checkpoint", type=Path, help="a train checkpoint such as models/best.pt instead of MLflow")
    p.add_argument(
        "--explain", type=Path, metavar="DIR", help="also write an explanation map per image into DIR (<image>.png)"
    )
    p.add_argument(
        "--isic",
        action="store_true",
        help="only the ISIC 2018 submission columns (without referred, out_of_distribution and ood_distance)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default: the probabilities evaluate reported), bf16 autocast (faster on CPUs with AMX or "
        "AVX512-BF16; probabilities differ in the second or third decimal) or auto (bf16 where native)",
    )
    args = p.parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        precision = resolve_precision(args.precision, torch.device("cpu"))
        if args.checkpoint:
            model, size = load_from_checkpoint(args.checkpoint)
        else:
            from src.tracking.runs import tracking_uri

            uri = args.model or f"models:/{params.tracking.registered_model}@champion"
            # the fp32 export's graph cannot run under autocast: bf16 (and maps) need the eager model it carries
            eager = args.explain is not None or precision == "bf16"
            model, size = load_from_mlflow(uri, tracking_uri(params.tracking), explainable=eager)
        if args.explain:
            from src.learn.explain import check_explainable

            check_explainable(model)  # before predicting: an export cannot be explained
        with autocast(torch.device("cpu"), precision):
            failed = predict_files(args.inputs, args.output, model, size, flags=not args.isic)
        if args.explain:
            write_explanations(find_images(args.inputs), model, size, args.explain)
        print(args.output)
        return 2 if failed else 0

    return cli.run_main(body)


def write_explanations(files: list[Path], model, size: int, out_dir: Path) -> None:
    """An explanation map over each readable image, titled with the predicted class and its probability."""
    from src.config import CLASSES
    from src.learn.explain import explained_batches
    from src.tracking.plots import explanation_png

    out_dir.mkdir(parents=True, exist_ok=True)
    for paths, images, maps, probs in explained_batches(model, files, size):
        for path, image, heat, p in zip(paths, images, maps, probs, strict=True):
            title = f"{path.stem}: {CLASSES[p.argmax()]} {p.max():.2f}"
            explanation_png(image, heat, title, out_dir / f"{path.stem}.png")


if __name__ == "__main__":
    sys.exit(main())
