"""The ``halffull`` command line: a dispatcher. Each subcommand lives in the module that does its job and adds
itself with ``register(subparsers)`` (loadtest/command.py); adding one is one line in ``COMMANDS``.
"""

from __future__ import annotations

import sys

from halffull.deploy import hf_export
from halffull.loadtest import command
from halffull.loadtest.bench import cli as bench_cli
from halffull.loadtest.experiments import compare as sim_compare
from halffull.loadtest.live import compare as live_compare
from halffull.loadtest.sim import cli as sim_cli
from halffull.replicas.sim import calibrate
from halffull.replicas.vllm import tiny_model

COMMANDS: tuple[command.Register, ...] = (
    sim_cli.register,        # simulate
    sim_compare.register,    # compare
    bench_cli.register,      # bench sim | router | serve
    tiny_model.register,     # make-tiny-model
    live_compare.register,   # loadtest compare
    hf_export.register,      # sim-tokenizer
    calibrate.register,      # calibrate
)


def build_parser():
    return command.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return command.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
