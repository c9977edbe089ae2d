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


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the given subcommands registered (all of them by default)."""
    parser = argparse.ArgumentParser(prog="bilevel", description="Differentiable bilevel optimization.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if commands is None else commands:
        importlib.import_module(COMMANDS[name]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the requested command's module; all of them for help or an unknown command.
    requested = [argv[0]] if argv and argv[0] in COMMANDS else None
    args = build_parser(requested).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
