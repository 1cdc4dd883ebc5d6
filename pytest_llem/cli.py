"""The ``llem`` command: the run record's schema, the built-in tiny model, and (later) compare,
report, merge and params."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pytest_llem import __version__
from pytest_llem.exceptions import LlemError

__all__ = ["build_parser", "main"]


def _cmd_schema(args: argparse.Namespace) -> int:
    from pytest_llem.results.store import run_record_schema

    print(json.dumps(run_record_schema(), indent=2 if args.indent else None))
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from pytest_llem.data.tiny_model import ensure_tiny_model, tiny_model_path

    quiet = args.path

    def progress(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    folder = ensure_tiny_model(progress=progress)
    if args.path:
        print(folder)
        return 0
    print(f"llem-tiny: {folder}")
    for item in sorted(tiny_model_path().iterdir()):
        print(f"  {item.name}  {item.stat().st_size} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``llem``."""
    parser = argparse.ArgumentParser(
        prog="llem", description="pytest-llem: LLM inference energy benchmarks with pytest."
    )
    parser.add_argument("--version", action="version", version=f"pytest-llem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    schema = commands.add_parser("schema", help="print the run record's JSON Schema")
    schema.add_argument("--indent", action="store_true", help="pretty-print")
    schema.set_defaults(func=_cmd_schema)
    tiny = commands.add_parser(
        "tiny-model", help="build the built-in llem-tiny model if needed and show where it is"
    )
    tiny.add_argument("--path", action="store_true", help="print only the model's folder")
    tiny.set_defaults(func=_cmd_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llem`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except LlemError as e:
        print(f"llem: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
