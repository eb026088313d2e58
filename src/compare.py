"""`python -m src.compare A B`: is model A better than model B on the same images? Balanced accuracy of both and
of A minus B, with a paired 95% interval that resamples lesions (A and B: MLflow run ids or predictions CSVs)."""

from __future__ import annotations

import json

from src import cli
from src.tracking.comparison import compare, load_predictions, verdict
from src.tracking.runs import tracking_uri


def report(result: dict[str, float], names: tuple[str, str], split: str) -> str:
    return "\n".join(
        [
            f"{split}: {result['images']} images of {result['lesions']} lesions; the two agree on "
            f"{result['agree']:.1%} of them",
            f"balanced accuracy  A {result['first']:.4f}  ({names[0]})",
            f"                   B {result['second']:.4f}  ({names[1]})",
            f"A - B {result['difference']:+.4f}, 95% interval {result['ci_low']:+.4f} to {result['ci_high']:+.4f} "
            "(paired bootstrap over lesions)",
            verdict(result, ("A", "B")),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Compare two evaluated models on the same images: balanced accuracy, paired 95% interval.")
    p.add_argument("first", metavar="A", help="MLflow run id (of a run evaluate finished) or a predictions CSV")
    p.add_argument("second", metavar="B", help="the same for the other model")
    p.add_argument("--split", choices=("test", "val"), default="test", help="whose predictions (default: test)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)

    def body() -> int:
        uri = tracking_uri(cli.load(args).tracking)
        names = (args.first, args.second)
        result = compare(*(load_predictions(ref, args.split, uri) for ref in names), names)
        print(json.dumps(result, indent=2) if args.json else report(result, names, args.split))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
