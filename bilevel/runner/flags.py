"""The flags every training command shares, one meaning per name, with defaults from its config.

:data:`SHARED` is the vocabulary: ``--out-dir``, ``--data-dir``, ``--device``,
``--seed``, ``--steps``, ``--resume``, ``--overwrite``, ``--checkpoint-every``,
``--log-every``, ``--no-progress``, ``--threads``, ``--max-minutes`` and, for the
adjoint solve and the inner problem, ``--solver``, ``--solver-maxiter``,
``--solver-rtol`` (scipy's words) and ``--inner-steps``. :func:`add_shared_flags`
adds them to a command's parser, each storing into the config field of its name
(or the one a command maps it to) with that field's default, so the config
dataclass stays the one source of defaults.

Older spellings stay accepted for one release through :func:`deprecated_alias`:
hidden from ``--help``, they store into the same field and print one line
naming the new spelling.

The pieces every parser uses:

- :func:`count` and :func:`real`: argparse types that refuse a bad number up front, naming the flag
  (``argument --steps: must be a whole number >= 1, got '-5'``).
- :func:`track_given` and :func:`given_flags`: which flags the user actually typed, so that
  ``--resume`` can restore every other setting from the checkpoint (:func:`restore`).
- :func:`add_run_flags`: ``--resume [latest|previous]`` and ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Callable, Collection, Iterable, Mapping

from bilevel.runner.checkpoint import RESUME_CHOICES

__all__ = ["SHARED", "add_run_flags", "add_shared_flags", "config_defaults", "config_from_args", "count",
           "deprecated_alias", "given_flags", "real", "restore", "run_from_args", "settings_of", "track_given"]

_GIVEN = "_given_flags"  # namespace attribute: dest -> the option string the user typed


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type for a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number between ``low`` and ``high`` (each bound closed unless
    ``*_open``; ``None`` for no bound)."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        wanted = f"{'<' if high_open else '<='} {high:g}"
    else:
        wanted = "finite"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number {wanted}, got {text!r}")
        return value

    return parse


class _Given:
    """Mixin for argparse actions: records that the user gave this flag (and how they spelled it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]
        given = dict(getattr(namespace, _GIVEN, {}))
        given[self.dest] = option_string or self.dest  # type: ignore[attr-defined]
        setattr(namespace, _GIVEN, given)


_TRACKED = {name: type(f"Given{base.__name__}", (_Given, base), {})
            for name, base in (("store", argparse._StoreAction), ("store_true", argparse._StoreTrueAction),
                               ("store_false", argparse._StoreFalseAction))}


def track_given(parser: argparse.ArgumentParser) -> None:
    """Make the ``store``, ``store_true`` and ``store_false`` arguments added to ``parser`` from now
    on record when they appear on the command line (read back with :func:`given_flags`)."""
    for name, action in _TRACKED.items():
        parser.register("action", name, action)
    parser.register("action", None, _TRACKED["store"])


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings given on the command line of a :func:`track_given` parser: dest -> flag typed."""
    return dict(getattr(args, _GIVEN, {}))


def settings_of(args: argparse.Namespace, drop: Iterable[str] = ("func", "command")) -> dict[str, Any]:
    """The parsed settings, without the dispatch entries ``drop`` and the record of given flags."""
    skip = {_GIVEN, *drop}
    return {k: v for k, v in vars(args).items() if k not in skip}


def add_run_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, checkpoint: str) -> None:
    """Add ``--resume [latest|previous]`` and ``--overwrite`` (mutually exclusive) to ``parser``;
    ``checkpoint`` names the checkpoint file(s) in the help."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", nargs="?", const="latest", choices=RESUME_CHOICES, default=None,
                       help=f"continue the run in the output folder from {checkpoint}, with the run's settings "
                            "(flags given here must match them, except the resumable ones); 'previous': from "
                            "the previous checkpoint kept beside it (when the latest one is damaged)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the files of the run already in the output folder and start over")


def restore(saved: Mapping[str, Any], current: Mapping[str, Any], given: Mapping[str, str],
            resumable: Collection[str], source: str | os.PathLike) -> dict[str, Any]:
    """The settings of a resumed run: the run's ``saved`` ones, with the flags ``given`` on top.

    Only keys of ``current`` are restored. A given flag whose value differs from
    the run's is an error naming it, unless it is ``resumable``.
    """
    conflicts = sorted(k for k in given if k in saved and k not in resumable and saved[k] != current[k])
    if conflicts:
        details = "; ".join(f"{given[k]} {current[k]!r} (the run has {saved[k]!r})" for k in conflicts)
        raise ValueError(f"cannot resume the run in {source} with other settings: {details}. Leave those flags "
                         "out to keep the run's values, or start a new run (--overwrite, or another output folder)")
    kept = {k: v for k, v in saved.items() if k in current and k not in given}
    return {**current, **kept}


SHARED = ("--out-dir", "--data-dir", "--device", "--seed", "--steps", "--resume", "--overwrite",
          "--checkpoint-every", "--log-every", "--no-progress", "--threads", "--max-minutes", "--solver",
          "--solver-maxiter", "--solver-rtol", "--inner-steps")
"""The flags of every training command."""

_HELP = {
    "out_dir": "output folder: metrics, checkpoints, final results (default {default})",
    "data_dir": "folder of the real data sets (default: $BILEVEL_DATA_DIR, else the nearest shared/data in the "
                "current folder or above, else ~/.cache/bilevel/data)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)",
    "seed": "seed of the data, the initialization and the sampling (default {default})",
    "steps": "training steps (default {default})",
    "checkpoint_every": "steps between checkpoints (default {default})",
    "log_every": "steps between metrics records (default {default})",
    "threads": "torch CPU threads (default: torch's)",
    "max_minutes": "stop training after this wall-clock time, at a log step: checkpointed, then the final "
                   "evaluation; --resume continues it",
    "solver": "linear solver of the adjoint system (default {default})",
    "solver_maxiter": "iteration cap of the adjoint solve (default {default})",
    "solver_rtol": "the adjoint solve converges when ||b - A v|| <= rtol ||b|| (default {default})",
    "inner_steps": "iterations of the inner solve (default {default})",
}
_TYPES = {"seed": count(0), "steps": count(1), "checkpoint_every": count(1), "log_every": count(1),
          "threads": count(1), "max_minutes": real(0, low_open=True), "solver_maxiter": count(1),
          "solver_rtol": real(0, low_open=True), "inner_steps": count(1)}


class _Deprecated(_TRACKED["store"]):  # type: ignore[misc, valid-type]
    """A hidden older spelling: stores like the new flag and says which that is."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str,
                     **kwargs: Any) -> None:
    """Accept ``old`` as a hidden spelling of ``new`` (storing into ``dest``; ``kwargs``: its type)."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def config_defaults(config_cls: type) -> dict[str, Any]:
    """The defaults of the dataclass ``config_cls`` (every field must have one)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(config_cls)}


def add_shared_flags(parser: argparse.ArgumentParser, config_cls: type, *,
                     fields: Mapping[str, str] | None = None, solvers: Iterable[str] | None = None,
                     help: Mapping[str, str] | None = None, skip: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """Add :data:`SHARED` to ``parser`` (a :func:`track_given` one), in a group "run".

    ``fields`` maps a flag's own field name (``"solver_maxiter"``) to the config field it
    stores into when that is named otherwise; ``solvers`` are ``--solver``'s choices;
    ``help`` replaces a flag's help (``{default}`` is filled in); ``skip`` names flags the
    caller adds itself (with the same spelling and meaning). Returns the group.
    """
    fields = dict(fields or {})
    defaults = config_defaults(config_cls)
    texts = {**_HELP, **(help or {})}
    group = parser.add_argument_group("run (shared by every training command)")
    skip = set(skip)

    def add(flag: str, **kwargs: Any) -> None:
        if flag in skip:
            return
        name = flag[2:].replace("-", "_")
        dest = fields.get(name, name)
        if dest not in defaults:
            raise ValueError(f"{config_cls.__name__} has no field {dest!r} for {flag}")
        text = texts[name].format(default=defaults[dest])
        group.add_argument(flag, dest=dest, default=defaults[dest], help=text, **kwargs)

    for flag in ("--out-dir", "--data-dir", "--device"):
        add(flag)
    for flag in ("--seed", "--steps", "--checkpoint-every", "--log-every", "--threads", "--max-minutes",
                 "--solver-maxiter", "--solver-rtol", "--inner-steps"):
        add(flag, type=_TYPES[flag[2:].replace("-", "_")])
    add("--solver", choices=sorted(solvers) if solvers is not None else None)
    if "--no-progress" not in skip:
        group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write the logged metrics for TensorBoard, in <out-dir>/tensorboard (needs the "
                            "tensorboard package)")
    runs = group.add_mutually_exclusive_group()
    runs.add_argument("--resume", nargs="?", const="latest", choices=RESUME_CHOICES, default=None,
                      help="continue the run in the output folder from its checkpoint, with the run's settings "
                           "(flags given here must match them, except the resumable ones); 'previous': from the "
                           "previous checkpoint kept beside it (when the latest one is damaged)")
    runs.add_argument("--overwrite", action="store_true",
                      help="delete the files of the run already in the output folder and start over")
    return group


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The config of the parsed ``args``: every field of ``config_cls`` found among them."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in settings_of(args).items() if k in names})


def run_from_args(command: Any, config: Any, args: argparse.Namespace, compare: Iterable[str] = ()) -> int:
    """Run ``command`` with ``config`` as the command line ``args`` asks (``--threads``,
    ``--resume``, ``--overwrite``, the flags given; ``compare``: fields that count as given
    whatever the command line, such as a subcommand); the command's exit status."""
    import torch

    from bilevel.runner.loop import run

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    given = {**given_flags(args), **{name: name for name in compare}}
    run(command, config, resume=args.resume or False, overwrite=args.overwrite, given=given,
        tensorboard=getattr(args, "tensorboard", False))
    return 0
