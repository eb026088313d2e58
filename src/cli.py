"""Shared command-line plumbing for the entry points: --params, -S overrides, logging, clean errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from src.config import DEFAULT_PARAMS, Params, apply_overrides, load_params
from src.errors import UserError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    p.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run, e.g. -S train.lr=0.001 (repeatable)",
    )
    return p


def load(args: argparse.Namespace) -> Params:
    """params.yaml (or --params) with the -S overrides applied, validated."""
    return apply_overrides(load_params(args.params), args.overrides)


def run_main(body: Callable[[], int | None]) -> int:
    """Run an entry point's body with logging set up; a UserError prints `error: ...` and exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return body() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
