"""The ``bilevel`` command: ``bilevel {imaml,hyperopt,fair,check} ...``.

Each subcommand lives with its problem (``bilevel.problems.<name>.cli``) and
exposes ``register(subparsers)``, which adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "imaml": "bilevel.problems.imaml.cli",
    "hyperopt": "bilevel.problems.hyperparameter.cli",
    "fair": "bilevel.problems.fair.cli",
    "check": "bilevel.testing.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Differentiable bilevel optimization.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
