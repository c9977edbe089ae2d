"""The ``bilevel`` command: ``bilevel {imaml,hyperopt,fair,prox,nested,check} ...``.

Each subcommand lives with its problem (``bilevel.problems.<name>.cli``) and
exposes ``register(subparsers)``, which adds its parser and sets ``func``.
Invalid settings and missing or corrupt files end the command with their
message and exit status 2 (``BILEVEL_TRACEBACK=1`` shows the traceback); a
training run stopped by SIGTERM or SIGINT ends, checkpointed, with one line
saying how to resume and the status ``128 + signum``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bilevel import __version__

COMMANDS = {
    "imaml": "bilevel.problems.imaml.cli",
    "hyperopt": "bilevel.problems.hyperparameter.cli",
    "fair": "bilevel.problems.fair.cli",
    "nested": "bilevel.problems.nested.cli",
    "prox": "bilevel.problems.prox.cli",
    "check": "bilevel.testing.cli",
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the given subcommands registered (all of them by default)."""
    parser = argparse.ArgumentParser(prog="bilevel", description="Differentiable bilevel optimization.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if commands is None else commands:
        importlib.import_module(COMMANDS[name]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the requested command's module; all of them for help or an unknown command.
    requested = [argv[0]] if argv and argv[0] in COMMANDS else None
    args = build_parser(requested).parse_args(argv)
    from bilevel.runner.stop import Preempted

    try:
        return int(args.func(args) or 0)
    except Preempted as stopped:  # SIGTERM or SIGINT: checkpointed; say how to go on
        print(f"bilevel {args.command}: {stopped}", file=sys.stderr)
        return stopped.status
    except (ValueError, OSError, FloatingPointError) as err:
        # bad settings, missing or corrupt files, a run that met NaN or Inf: say what, not where
        if os.environ.get("BILEVEL_TRACEBACK"):
            raise
        print(f"bilevel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
