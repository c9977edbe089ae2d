"""Every flag the docs give a ``bilevel`` command exists in that command's parser.

Two places are read, in README.md and every page under docs/:

- command lines: each ``bilevel <command> ...`` (also ``-m bilevel <command>`` under torchrun) in
  a code block or an inline code span, with its continuation lines. Every ``--flag`` on it must
  be one the command's ``--help`` shows: a deprecated spelling, hidden from ``--help``, is not
  for a reader to copy.
- a command's own guide (``imaml.md`` for ``bilevel imaml``, ...): every ``--flag`` in an
  inline code span must be a flag of that command, unless the span is part of another
  program's command line (a benchmark script, torchrun). A hidden older spelling may be
  named on a line that says it is one ("older spelling", "deprecated").

The parsers are built by :func:`bilevel.cli.build_parser`, as ``bilevel`` builds them.
"""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path

import pytest

from bilevel.cli import COMMANDS, build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
         *sorted((REPO_ROOT / "docs" / "results").glob("*.md"))]
GUIDES = {"imaml.md": "imaml", "hyperparameter.md": "hyperopt", "fair.md": "fair", "nested.md": "nested",
          "prox.md": "prox", "checking.md": "check"}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
COMMAND = re.compile(r"(?:^|[\s`(])(?:-m\s+)?bilevel\s+(" + "|".join(COMMANDS) + r")\b")
OTHER_PROGRAM = re.compile(r"\b(?:python|pytest|torchrun|sphinx-build|pip|bash|git)\b[^`]*")
DEPRECATED_NOTE = re.compile(r"older spelling|deprecated", re.I)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(shown, hidden) option strings of ``parser`` and of every parser below it."""
    shown, hidden = set(), set()
    for action in parser._actions:
        (hidden if action.help == argparse.SUPPRESS else shown).update(action.option_strings)
    for sub in _subparsers(parser).values():
        more_shown, more_hidden = _options(sub)
        shown |= more_shown
        hidden |= more_hidden
    return shown, hidden - shown


@cache
def flags_of(command: str) -> tuple[frozenset[str], frozenset[str]]:
    """(shown, hidden) flags of ``bilevel <command>``; ``hyperopt``: of both its tasks."""
    shown, hidden = _options(_subparsers(build_parser())[command])
    return frozenset(shown), frozenset(hidden)


def code_text(page: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every code line (fenced or indented blocks, with continuation lines
    joined) and of every inline code span of ``page``."""
    found: list[tuple[int, str]] = []
    fenced = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(page.read_text().split("\n"), 1):
        is_fence = line.lstrip().startswith("```")
        in_code = fenced or (line.startswith("    ") and (pending is not None
                                                   or not line.lstrip().startswith(("- ", "* ", "|"))))
        if is_fence:
            fenced = not fenced
        if in_code and not is_fence:
            text = line.strip()
            if pending is not None:  # a continuation of the line before: drop a comment's leading '#'
                pending = (pending[0], pending[1] + " " + text.lstrip("# "))
            else:
                pending = (number, text)
            if not text.endswith("\\"):
                found.append(pending)
                pending = None
            continue
        if pending is not None:
            found.append(pending)
            pending = None
        if not fenced:
            found += [(number, span) for span in re.findall(r"`([^`\n]+)`", line)]
    return found


def command_lines(page: Path) -> list[tuple[int, str, str]]:
    """``(line, command, its arguments)`` of every ``bilevel`` command line of ``page``.

    A line of a code block that starts with ``...`` continues the last command of that
    block. The arguments end at a comment, a pipe or the next command.
    """
    lines, last = [], None
    for number, text in code_text(page):
        matches = list(COMMAND.finditer(text))
        if not matches and text.startswith("...") and last is not None:
            lines += [(number, last, part) for part in text.split("...") if part.strip()]
            continue
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            args = re.split(r"\s#|\||;|&&", text[match.end():end])[0]
            lines.append((number, match.group(1), args))
            last = match.group(1)
    return lines


def test_command_lines_are_found():
    readme = command_lines(REPO_ROOT / "README.md")
    assert {command for _, command, _ in readme} >= {"imaml", "hyperopt", "check"}
    assert any("--points" in args for _, command, args in readme if command == "check")
    sample = REPO_ROOT / "docs" / "imaml.md"
    assert sum(command == "imaml" for _, command, _ in command_lines(sample)) >= 5


def test_the_parsers_know_the_shared_flags():
    shown, hidden = flags_of("imaml")
    assert {"--out-dir", "--solver", "--solver-maxiter", "--inner-steps"} <= shown
    assert "--out-dir" not in flags_of("check")[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_documented_command_lines_use_existing_flags(page):
    wrong = []
    for line, command, args in command_lines(page):
        shown, hidden = flags_of(command)
        for flag in FLAG.findall(args):
            if flag in hidden:
                wrong.append(f"{page.name}:{line}: bilevel {command} {flag} is a deprecated spelling")
            elif flag not in shown:
                wrong.append(f"{page.name}:{line}: bilevel {command} has no {flag}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_a_commands_guide_names_only_its_flags(name):
    page = REPO_ROOT / "docs" / name
    command = GUIDES[name]
    shown, hidden = flags_of(command)
    lines = page.read_text().split("\n")
    wrong = []
    for line, text in code_text(page):
        if COMMAND.search(text):
            continue  # a command line: checked above, possibly of another command
        text = OTHER_PROGRAM.sub("", text)
        for flag in FLAG.findall(text):
            if flag in shown or (flag in hidden and DEPRECATED_NOTE.search(lines[line - 1])):
                continue
            wrong.append(f"{name}:{line}: bilevel {command} has no {flag}")
    assert not wrong, "\n".join(wrong)


def _choices(command: str) -> dict[str, set[str]]:
    """Flag -> its choices, for the flags of ``bilevel <command>`` that have them."""
    found: dict[str, set[str]] = {}
    parsers = [_subparsers(build_parser())[command]]
    while parsers:
        parser = parsers.pop()
        parsers += _subparsers(parser).values()
        for action in parser._actions:
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                for flag in action.option_strings:
                    found.setdefault(flag, set()).update(map(str, action.choices))
    return found


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_documented_choices_are_the_parsers(name):
    """A guide's ``--flag {a,b,c}`` lists exactly the choices the command accepts."""
    page = REPO_ROOT / "docs" / name
    choices = _choices(GUIDES[name])
    wrong = []
    for line, text in code_text(page):
        for flag, listed in re.findall(r"(--[a-z][a-z0-9-]*) \{([^}]*)\}", text):
            documented = {c.strip() for c in listed.split(",")}
            if flag in choices and documented != choices[flag]:
                wrong.append(f"{name}:{line}: {flag} {{{listed}}}, the command takes {sorted(choices[flag])}")
    assert not wrong, "\n".join(wrong)
