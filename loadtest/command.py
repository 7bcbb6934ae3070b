"""The subcommand protocol of the ``halffull`` command line, shared by loadtest/cli.py and the modules' own
``python -m`` entry points.

A subcommand is a module with ``register(subparsers)``: it adds its parser (``subparsers.add_parser(...)``),
its flags, and ``set_defaults(func=...)`` with the function that runs it (``func(args) -> exit status``).
``run`` parses, calls ``func`` and turns bad input (ValueError, FileNotFoundError) into ``error: ...`` on stderr
and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, Sequence

Register = Callable[[argparse._SubParsersAction], object]


def build_parser(registers: Iterable[Register], *, prog: str = "halffull",
                 description: str = "LLM scheduling for Ray Serve + vLLM") -> argparse.ArgumentParser:
    """A parser whose subcommands are added by ``registers``, in order (the order of ``--help``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in registers:
        register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (None: ``sys.argv[1:]``) and run the chosen subcommand; its exit status."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
