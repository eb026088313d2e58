"""`python -m src.faithfulness`: which explanation map points at what the prediction needs? Deletion and insertion
AUC per map method (src.learn.faithfulness) on a class-balanced subset of a split, printed and written as CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src import cli
from src.errors import UserError
from src.fileio import write_text
from src.ingest.rawdata import DataError
from src.learn.data import load_split
from src.learn.explain import METHODS
from src.learn.faithfulness import balanced_subset, faithfulness_table, format_table
from src.learn.inference import CHECKPOINT_FILE, load_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Measure how faithful each explanation map is: deletion and insertion AUC on a split's images.")
    p.add_argument("--checkpoint", type=Path, help=f"train checkpoint (default: <paths.models>/{CHECKPOINT_FILE})")
    p.add_argument("--split", choices=("test", "val"), default="test", help="whose images (default: test)")
    p.add_argument("--images", type=int, default=100, help="how many, classes balanced (default 100)")
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps over the patch grid (default 16)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="maps to measure")
    p.add_argument("-o", "--output", type=Path, help="CSV to write (default: <paths.reports>/faithfulness.csv)")
    args = p.parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        if args.images < 1 or args.steps < 1:
            raise UserError("--images and --steps must be positive")
        triage, size = load_from_checkpoint(args.checkpoint or params.paths.models / CHECKPOINT_FILE)
        served = triage.served  # the maps explain the probabilities; the flags play no part
        split = load_split(params.paths, args.split)
        if split.dataset.image_size != size:
            raise DataError(
                f"{split.dataset.cache_file}: images are {split.dataset.image_size} px but the model was trained at "
                f"{size} px; pass the params.yaml the checkpoint was trained with (--params)"
            )
        picks = balanced_subset(split.dataset.labels, args.images)
        images = np.stack([split.dataset[int(i)][0].numpy() for i in picks])
        table = faithfulness_table(served, images, args.methods, args.steps)
        output = args.output or params.paths.reports / "faithfulness.csv"
        write_text(output, table.to_csv(index=False))
        print(format_table(table))
        print(output)
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
