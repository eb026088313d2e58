"""Stage `download`: put HAM10000 into the normalised layout under paths.raw, whatever data.source names."""

from __future__ import annotations

from src import cli
from src.ingest.download import download


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("Put HAM10000 into the normalised layout under paths.raw.").parse_args(argv)

    def body() -> None:
        params = cli.load(args)
        print(download(params.data, params.paths))

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
