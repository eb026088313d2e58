"""Speed benchmark: the device's ceiling, model-only and real training throughput, a naive baseline, inference.

    python -m src.bench [--params params.yaml] [-S key=value ...] [--images DIR] [--steps N] [--max-images N]
                        [--output bench/bench.json] [--compile] [--workers N ...] [--precision fp32|bf16 ...]

The measures live in src/benchmark/; this module parses the options, runs them and writes the table and JSON.
"""

from __future__ import annotations

from pathlib import Path

from src import cli
from src.benchmark.options import BenchOptions
from src.benchmark.run import run_benchmark
from src.benchmark.table import format_table
from src.errors import UserError
from src.fileio import write_json

DEFAULT_OUTPUT = Path("bench/bench.json")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Benchmark training and inference speed for the configured model and image size.")
    p.add_argument("--images", type=Path, help="folder of real images (or one holding images/); default: generated")
    p.add_argument("--steps", type=int, default=BenchOptions.steps, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=BenchOptions.warmup, help="untimed steps first (default 3)")
    p.add_argument("--max-images", type=int, default=BenchOptions.max_images, help="cap on images used (default 2000)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON to write (default {DEFAULT_OUTPUT})")
    p.add_argument("--compile", action="store_true", help="add a row for the torch.compile'd model-only step")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also time the real path with these loader worker counts, e.g. --workers 0 1",
    )
    p.add_argument(
        "--precision",
        dest="precisions",
        action="append",
        choices=["fp32", "bf16"],
        default=[],
        help="measure in this precision (repeatable); default: fp32, and bf16 where the device has it natively",
    )
    args = p.parse_args(argv)

    def body() -> int:
        if args.steps < 1 or args.warmup < 1 or args.max_images < 1 or any(w < 0 for w in args.workers):
            raise UserError("--steps, --warmup and --max-images must be positive, --workers not negative")
        opts = BenchOptions(
            images=args.images,
            steps=args.steps,
            warmup=args.warmup,
            max_images=args.max_images,
            compile=args.compile,
            workers=tuple(args.workers),
            precisions=tuple(args.precisions),
        )
        result = run_benchmark(cli.load(args), opts)
        write_json(args.output, result)
        print(format_table(result))
        print(args.output)
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
