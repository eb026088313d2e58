"""Stage `split`: lesion- and duplicate-grouped, class-stratified train/val/test split plus the image cache."""

from __future__ import annotations

from src import cli
from src.prepare.split import format_table, split


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("Split HAM10000 into lesion-grouped train/val/test sets and cache the images.").parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        report = split(params.paths.raw, params.split, params.data, params.paths)
        print(format_table(report))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
