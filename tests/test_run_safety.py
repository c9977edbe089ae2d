"""Runs that are safe to stop, restart and repeat, for every training command (``bilevel imaml``,
``hyperopt``, ``fair``, ``prox``, ``nested``).

Fault injection: each command is killed with SIGKILL in a subprocess, at a
seeded random file operation on its output folder (a checkpoint or log write
torn half-way, or the moment before a rename or link) or after a seeded random
delay, then resumed with ``--resume`` and no other flag; it must end exactly as
an uninterrupted run. Preemption: SIGTERM or SIGINT at a seeded random moment
must end the run with a checkpoint of its last step, one line saying how to
resume and the status ``128 + signum``, and ``--resume`` must end exactly as an
uninterrupted run; a second SIGINT ends it at once. One run per output folder:
a folder whose lock a live process holds is refused, naming that process, and a
dead process's lock is taken over. Damaged checkpoints (a flipped byte, truncated, empty,
not a checkpoint) must give one clear line naming the file and the way out,
and the previous checkpoint kept beside them must let the run finish. Also:
refused re-runs, ``--overwrite``, bad counts, settings restored on resume, and
damaged data archives.

``BILEVEL_KILL_POINTS`` sets the kills per command (default 2: one at a file
operation, one after a delay); the figures in docs/reliability.md come
from a larger value. This file doubles as the subprocess that gets killed:
``python tests/test_run_safety.py <event|timer|signal> <value> <folder> <bilevel argv...>``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bilevel import checkpoint
from bilevel.cli import main
from bilevel.errors import CheckpointError
from bilevel.runs import count, read_records, real

KILL_POINTS = int(os.environ.get("BILEVEL_KILL_POINTS", "2"))
LINUX = sys.platform.startswith("linux")


# ---------------------------------------------------------------- fault injection


class FaultPoints:
    """Counts the file operations (fsync, rename, link) a run makes in its output folder, and
    kills the process with SIGKILL at operation ``kill_at`` or ``delay`` seconds after the first.

    Killed at an fsync of a file, the file is first cut to ``tear`` of its length: a write
    torn half-way. Reads the paths of file descriptors from /proc (Linux).
    """

    def __init__(self, folder: Path, *, kill_at: int | None = None, tear: float = 0.5,
                 delay: float | None = None, signals: tuple[int, ...] = (signal.SIGKILL,)) -> None:
        self.folder = os.path.abspath(folder)
        self.kill_at, self.tear, self.delay, self.signals = kill_at, tear, delay, signals
        self.count = 0
        self.first: float | None = None
        self.real = {name: getattr(os, name) for name in ("fsync", "replace", "link")}

    def install(self, setattr_: Callable[[Any, str, Any], None]) -> None:
        for name in self.real:
            setattr_(os, name, getattr(self, f"_{name}"))

    def _mine(self, path: Any) -> bool:
        path = os.path.abspath(path)
        return path == self.folder or path.startswith(self.folder + os.sep)

    def _event(self, path: Any, fd: int | None = None) -> None:
        if not self._mine(path):
            return
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
            if self.delay is not None:
                timer = threading.Timer(self.delay, self._send)
                timer.daemon = True
                timer.start()
        if self.count == self.kill_at:
            if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, int(os.fstat(fd).st_size * self.tear))
            os.kill(os.getpid(), signal.SIGKILL)

    def _send(self) -> None:
        for number, signum in enumerate(self.signals):
            if number:
                time.sleep(0.05)
            os.kill(os.getpid(), signum)

    def _fsync(self, fd: int) -> None:
        self._event(os.readlink(f"/proc/self/fd/{fd}"), fd)
        self.real["fsync"](fd)

    def _replace(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._event(dst)
        self.real["replace"](src, dst, **kwargs)

    def _link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._event(dst)
        self.real["link"](src, dst, **kwargs)


def _driver(argv: list[str]) -> int:
    """The killed subprocess: ``<event|timer|signal> <operation number | delay | signals:delay> <folder>
    <bilevel argv...>``; ``signals`` such as ``TERM`` or ``INT+INT`` (sent 0.05 s apart)."""
    mode, value, folder, *command = argv
    torch.set_num_threads(int(os.environ["BILEVEL_TEST_THREADS"]))  # the same arithmetic as the parent's
    if mode == "event":
        number, tear = value.split(":")
        points = FaultPoints(Path(folder), kill_at=int(number), tear=float(tear))
    elif mode == "signal":
        names, delay = value.split(":")
        signals = tuple(getattr(signal, f"SIG{name}") for name in names.split("+"))
        points = FaultPoints(Path(folder), delay=float(delay), signals=signals)
    else:
        points = FaultPoints(Path(folder), delay=float(value))
    points.install(setattr)
    return main(command)


# ---------------------------------------------------------------- the five commands


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _tensors_equal(a: Any, b: Any) -> bool:
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    return spec_a == spec_b and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y or (x != x and y != y)  # NaN == NaN here
        for x, y in zip(leaves_a, leaves_b))


def _imaml_outcome(out: Path) -> dict:
    final = json.loads((out / "final.json").read_text())
    state = _without(checkpoint.load(out / "checkpoint.pt"), "seconds")
    for config in (final["config"], state["config"], final.get("baseline", {})):
        config.pop("out_dir", None)  # where the run happened to be
    metrics = [_without(r, "seconds") for r in read_records(out / "metrics.jsonl")]
    return {"final": final, "metrics": metrics, "state": state}


def _hyperopt_outcome(out: Path) -> dict:
    final = json.loads((out / "final.json").read_text())
    state = checkpoint.load(out / "checkpoint.pt")
    return {"final": _without(final["final"], "time"), "selected": _without(final["selected"], "time"),
            "metrics": [_without(r, "time") for r in read_records(out / "metrics.jsonl")],
            "state": state["state"]["state"], "step": state["step"]}


def _fair_outcome(out: Path) -> dict:
    state = checkpoint.load(out / "checkpoint.pt")
    return {"results": json.loads((out / "final.json").read_text())["results"],
            "logs": [_without(x, "seconds") for x in read_records(out / "metrics.jsonl")],
            "state": state["state"], "step": state["step"]}


def _prox_outcome(out: Path) -> dict:
    final = json.loads((out / "final.json").read_text())
    state = checkpoint.load(out / "checkpoint.pt")
    return {"final": _without(final, "seconds"), "metrics": [_without(r, "time") for r in read_records(
        out / "metrics.jsonl")], "state": _without(state["state"], "elapsed"), "step": state["step"]}


def _nested_outcome(out: Path) -> dict:
    final = json.loads((out / "final.json").read_text())
    state = checkpoint.load(out / "checkpoint.pt")
    return {"final": _without(final, "seconds", "peak_mib"),
            "metrics": [_without(r, "seconds") for r in read_records(out / "metrics.jsonl")],
            "state": _without(state["state"], "elapsed"), "step": state["step"]}


@dataclass(frozen=True)
class Command:
    name: str
    fresh: Callable[[Path, Path], list[str]]  # (output folder, data folder) -> argv of a new run
    resume: Callable[[Path], list[str]]  # argv that resumes it, no setting given
    checkpoint: str  # the file that makes a folder resumable
    outcome: Callable[[Path], dict]  # what an interrupted and resumed run must reproduce exactly


COMMANDS = {
    "imaml": Command(
        "imaml",
        lambda out, data: ["imaml", "--steps", "4", "--meta-batch", "2", "--inner-steps", "2", "--inner-optimizer",
                           "gd", "--solver-maxiter", "2", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "1",
                           "--eval-tasks", "2", "--final-tasks", "2", "--seed", "3", "--baseline", "none",
                           "--no-progress", "--out-dir", str(out)],
        lambda out: ["imaml", "--out-dir", str(out), "--resume"], "checkpoint.pt", _imaml_outcome),
    "hyperopt": Command(
        "hyperopt",
        lambda out, data: ["hyperopt", "l2", "--dataset", "wine", "--data-dir", str(data), "--n-train", "80",
                           "--n-val", "50", "--n-test", "48", "--steps", "4", "--checkpoint-every", "1",
                           "--seed", "3", "--no-progress", "--no-plot", "--out-dir", str(out)],
        lambda out: ["hyperopt", "l2", "--out-dir", str(out), "--resume"], "checkpoint.pt", _hyperopt_outcome),
    "fair": Command(
        "fair",
        lambda out, data: ["fair", "--dataset", "lsac", "--data-dir", str(data), "--methods", "fair", "pdfm",
                           "--c", "0.05", "--steps", "4", "--checkpoint-every", "2", "--meta-batch", "2",
                           "--episodes", "2", "--test-fraction", "0.1", "--newton-steps", "8", "--seed", "3",
                           "--no-progress", "--out-dir", str(out)],
        lambda out: ["fair", "--out-dir", str(out), "--resume"], "checkpoint.pt", _fair_outcome),
    "prox": Command(
        "prox",
        lambda out, data: ["prox", "--size", "12", "--n-train", "2", "--n-test", "2", "--grid", "3", "--filters",
                           "tv", "--steps", "4", "--checkpoint-every", "1", "--mode", "pg", "--seed", "3",
                           "--no-progress", "--device", "cpu", "--out-dir", str(out)],
        lambda out: ["prox", "--out-dir", str(out), "--resume"], "checkpoint.pt", _prox_outcome),
    "nested": Command(
        "nested",
        lambda out, data: ["nested", "--train-tasks", "4", "--val-tasks", "2", "--test-tasks", "4", "--shots", "3",
                           "--queries", "3", "--inner-steps", "2", "--solver-maxiter", "2", "--weight-every", "2",
                           "--weight-start", "0", "--outer-solver-steps", "2", "--steps", "4", "--log-every", "1",
                           "--checkpoint-every", "1", "--seed", "3", "--no-progress", "--device", "cpu",
                           "--out-dir", str(out)],
        lambda out: ["nested", "--out-dir", str(out), "--resume"], "checkpoint.pt", _nested_outcome),
}


@dataclass
class Reference:
    out: Path
    outcome: dict
    operations: int  # file operations on the output folder: the kill points
    seconds: float  # from the first of them to the end


_REFERENCES: dict[str, Reference] = {}


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory) -> Callable[[str], Reference]:
    """An uninterrupted run of each command (made on first use), with its file operations counted."""

    def get(name: str) -> Reference:
        if name not in _REFERENCES:
            out = tmp_path_factory.mktemp(f"{name}-reference") / "run"
            points = FaultPoints(out)
            with pytest.MonkeyPatch.context() as patch:
                points.install(patch.setattr)
                assert main(COMMANDS[name].fresh(out, shared_data)) == 0
            seconds = time.perf_counter() - points.first
            _REFERENCES[name] = Reference(out, COMMANDS[name].outcome(out), points.count, seconds)
        return _REFERENCES[name]

    return get


def _copy(ref: Reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(ref.out, out)
    return out


def _error_line(capsys, name: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bilevel {name}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- item 7: refused re-runs, --overwrite, bad counts


@pytest.mark.parametrize("name", COMMANDS)
def test_a_finished_run_is_refused_and_overwrite_starts_it_over(name, reference, shared_data, tmp_path, capsys):
    ref = reference(name)
    out = _copy(ref, tmp_path)

    def files() -> dict:  # the lock file holds the pid of the run that last took it
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}

    before = files()
    argv = COMMANDS[name].fresh(out, shared_data)
    capsys.readouterr()
    assert main(argv) == 2
    err = _error_line(capsys, name)
    assert f"{out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert files() == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    (out / COMMANDS[name].checkpoint).write_bytes(b"")  # even a damaged run is overwritten
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only the command's own files are deleted
    assert _tensors_equal(COMMANDS[name].outcome(out), ref.outcome)


@pytest.mark.parametrize("argv,message", [
    (["imaml", "--steps", "-5"], "argument --steps: must be a whole number >= 1, got '-5'"),
    (["imaml", "--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
    (["imaml", "--meta-batch", "2.5"], "argument --meta-batch: must be a whole number >= 1, got '2.5'"),
    (["imaml", "--seed", "-1"], "argument --seed: must be a whole number >= 0, got '-1'"),
    (["imaml", "--meta-lr", "0"], "argument --meta-lr: must be a number > 0, got '0'"),
    (["imaml", "--damping", "nan"], "argument --damping: must be a number >= 0, got 'nan'"),
    (["imaml", "--max-minutes", "-1"], "argument --max-minutes: must be a number > 0, got '-1'"),
    (["hyperopt", "l2", "--steps", "-5"], "argument --steps: must be a whole number >= 1, got '-5'"),
    (["hyperopt", "l2", "--n-train", "0"], "argument --n-train: must be a whole number >= 1, got '0'"),
    (["hyperopt", "cleaning", "--corruption", "1.5"], "argument --corruption: must be a number in [0, 1], got '1.5'"),
    (["hyperopt", "l2", "--tol-decay", "0"], "argument --tol-decay: must be a number in (0, 1], got '0'"),
    (["hyperopt", "l2", "--checkpoint-every", "0"], "argument --checkpoint-every: must be a whole number >= 1"),
    (["fair", "--steps", "-5"], "argument --steps: must be a whole number >= 1, got '-5'"),
    (["fair", "--k-shot", "0"], "argument --k-shot: must be a whole number >= 1, got '0'"),
    (["fair", "--c", "0.1", "-0.1"], "argument --c: must be a number >= 0, got '-0.1'"),
    (["fair", "--test-fraction", "1"], "argument --test-fraction: must be a number in (0, 1), got '1'"),
    (["fair", "--episodes", "x"], "argument --episodes: must be a whole number >= 1, got 'x'"),
    (["imaml", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_numbers_are_refused_before_anything_is_written(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folders would land here
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@given(st.integers(-10**6, 10**6))
def test_counts_accept_exactly_the_whole_numbers_from_their_minimum(n):
    for minimum in (0, 1):
        if n >= minimum:
            assert count(minimum)(str(n)) == n
        else:
            with pytest.raises(argparse.ArgumentTypeError, match=f">= {minimum}, got '{n}'"):
                count(minimum)(str(n))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_numbers_accept_exactly_their_interval(x):
    parse = real(0, 1, low_open=True)
    if 0 < x <= 1:
        assert parse(repr(x)) == x
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\]"):
            parse(repr(x))


# ---------------------------------------------------------------- item 10: --resume restores the settings


def test_imaml_resume_compares_only_the_flags_given(reference, tmp_path, capsys):
    out = _copy(reference("imaml"), tmp_path)
    capsys.readouterr()
    assert main(["imaml", "--out-dir", str(out), "--resume", "--seed", "0"]) == 2  # 0 is the default: still given
    err = _error_line(capsys, "imaml")
    assert "--seed 0 (the run has 3)" in err and "Leave those flags out" in err
    # a resumable flag may change; a flag equal to the run's value is accepted
    assert main(["imaml", "--out-dir", str(out), "--resume", "--steps", "5", "--meta-batch", "2"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["meta_steps"] == 5 and final["config"]["seed"] == 3 and final["config"]["inner_steps"] == 2
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_hyperopt_resume_compares_only_the_flags_given(reference, tmp_path, capsys):
    out = _copy(reference("hyperopt"), tmp_path)
    capsys.readouterr()
    assert main(["hyperopt", "l2", "--out-dir", str(out), "--resume", "--seed", "0"]) == 2
    assert "--seed 0 (the run has 3)" in _error_line(capsys, "hyperopt")
    assert main(["hyperopt", "cleaning", "--out-dir", str(out), "--resume"]) == 2
    assert "task 'cleaning' (the run has 'l2')" in _error_line(capsys, "hyperopt")
    assert main(["hyperopt", "l2", "--out-dir", str(out), "--resume", "--steps", "5", "--n-train", "80"]) == 0
    rows = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    assert json.loads((out / "final.json").read_text())["config"]["seed"] == 3


def test_fair_resume_compares_only_the_flags_given(reference, tmp_path, capsys):
    out = _copy(reference("fair"), tmp_path)
    capsys.readouterr()
    assert main(["fair", "--out-dir", str(out), "--resume", "--steps", "8"]) == 2  # results so far used 4 steps
    assert "--steps 8 (the run has 4)" in _error_line(capsys, "fair")
    assert main(["fair", "--out-dir", str(out), "--resume", "--c", "0.05", "--device", "cpu"]) == 0
    assert json.loads((out / "final.json").read_text())["results"] == reference("fair").outcome["results"]


# ---------------------------------------------------------------- item 8: damaged checkpoints


def _flip(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path: Path, rng: random.Random) -> None:
    path.write_bytes(path.read_bytes()[:rng.randrange(1, path.stat().st_size)])


def _empty(path: Path, rng: random.Random) -> None:
    path.write_bytes(b"")


def _foreign(path: Path, rng: random.Random) -> None:
    torch.save({"step": 1}, path)  # what an older bilevel wrote: no digest


DAMAGES = {"byte-flipped": (_flip, r"is damaged: the SHA-256"), "truncated": (_truncate, r"is (truncated|damaged)"),
           "empty": (_empty, r"is empty \(0 bytes\)"), "not a checkpoint": (_foreign, r"has no digest header")}


@pytest.mark.parametrize("name", COMMANDS)
def test_damaged_checkpoints_are_named_and_the_previous_one_finishes_the_run(name, reference, tmp_path, capsys):
    ref = reference(name)
    out = _copy(ref, tmp_path)
    damaged = out / "checkpoint.pt"
    good = damaged.read_bytes()
    rng = random.Random(f"damage-{name}")
    capsys.readouterr()
    for label, (damage, problem) in DAMAGES.items():
        damage(damaged, rng)
        assert main(COMMANDS[name].resume(out)) == 2, label
        err = _error_line(capsys, name)
        assert re.search(f"checkpoint {re.escape(str(damaged))} {problem}", err), (label, err)
        assert f"The previous checkpoint {checkpoint.previous_path(damaged)} is intact" in err
        assert "--resume previous" in err and "--overwrite" in err
        damaged.write_bytes(good)
    _flip(damaged, rng)
    assert main([*COMMANDS[name].resume(out)[:-1], "--resume", "previous"]) == 0
    assert _tensors_equal(COMMANDS[name].outcome(out), ref.outcome)


# ---------------------------------------------------------------- kill -9 at random moments, then --resume


@pytest.mark.skipif(not LINUX, reason="reads file descriptor paths from /proc")
@pytest.mark.parametrize("point", range(KILL_POINTS))
@pytest.mark.parametrize("name", COMMANDS)
def test_killed_at_a_random_moment_resume_ends_as_an_uninterrupted_run(name, point, reference, shared_data,
                                                                      tmp_path):
    ref = reference(name)
    command = COMMANDS[name]
    rng = random.Random(f"kill-{name}-{point}")
    out = tmp_path / "run"
    timer = point == KILL_POINTS - 1 and KILL_POINTS > 1  # the last point of each command: after a delay
    slices = max(1, KILL_POINTS - 1)  # the other points: one operation drawn in each slice of the run
    first, last = 1 + ref.operations * point // slices, max(1, ref.operations * (point + 1) // slices)
    value = (f"{rng.uniform(0, ref.seconds):.3f}" if timer
             else f"{rng.randint(first, max(first, last))}:{rng.uniform(0, 1):.3f}")
    env = {**os.environ, "BILEVEL_TEST_THREADS": str(torch.get_num_threads()), "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, __file__, "timer" if timer else "event", value, str(out),
                             *command.fresh(out, shared_data)], env=env, capture_output=True, text=True)
    if not timer:  # a file operation of the run: it is always reached
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    else:
        assert killed.returncode in (0, -signal.SIGKILL), killed.stderr[-2000:]
    resumable = (out / command.checkpoint).exists()
    print(f"{name}: killed {'after' if timer else 'at operation'} {value} (exit {killed.returncode}), "
          f"{'resumed' if resumable else 'started again'}")  # shown with pytest -rP
    assert main(command.resume(out) if resumable else command.fresh(out, shared_data)) == 0
    assert _tensors_equal(command.outcome(out), ref.outcome)
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------- SIGTERM and SIGINT at random moments, then --resume


def _drive(how: str, out: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "BILEVEL_TEST_THREADS": str(torch.get_num_threads()), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, __file__, "signal", how, str(out), *argv], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("signame", ["TERM", "INT"])
@pytest.mark.parametrize("name", COMMANDS)
def test_preempted_at_a_random_moment_checkpoints_says_how_to_resume_and_resume_ends_as_uninterrupted(
        name, signame, reference, shared_data, tmp_path):
    ref = reference(name)
    command = COMMANDS[name]
    delay = random.Random(f"preempt-{name}-{signame}").uniform(0, 0.5 * ref.seconds)  # mostly before the end
    out = tmp_path / "run"
    began = time.perf_counter()
    stopped = _drive(f"{signame}:{delay:.3f}", out, command.fresh(out, shared_data))
    signum = getattr(signal, f"SIG{signame}")
    print(f"{name}: SIG{signame} after {delay:.3f} s: exit {stopped.returncode}")  # shown with pytest -rP
    if stopped.returncode == 0:  # the run ended before the signal came
        assert _tensors_equal(command.outcome(out), ref.outcome)
        return
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert time.perf_counter() - began < 60
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bilevel {name}: SIG{signame}: the run in {out} stopped at step "), last
    assert f"--out-dir {out} --resume" in last and "Traceback" not in stopped.stderr
    step = int(re.search(r"stopped at step (\d+)", last).group(1))
    assert checkpoint.load(out / command.checkpoint)["step"] == step  # the last completed step, not an older one
    assert main(command.resume(out)) == 0
    assert _tensors_equal(command.outcome(out), ref.outcome)
    assert not list(out.glob("*.tmp"))


def test_a_second_interrupt_stops_at_once_and_the_checkpoint_on_disk_resumes(reference, shared_data, tmp_path):
    ref = reference("imaml")
    command = COMMANDS["imaml"]
    out = tmp_path / "run"
    stopped = _drive(f"INT+INT:{ref.seconds / 3:.3f}", out, command.fresh(out, shared_data))
    if stopped.returncode == 0:  # both came after the end
        return
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-2000:]
    assert "stopped at once (second interrupt)" in stopped.stderr or "--resume" in stopped.stderr
    assert main(command.resume(out)) == 0
    assert _tensors_equal(command.outcome(out), ref.outcome)


# ---------------------------------------------------------------- one run per output folder


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = ("import sys, time; from bilevel.runner.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_folder_held_by_a_live_run_is_refused_naming_it_and_a_dead_ones_lock_is_taken_over(
        reference, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        capsys.readouterr()
        assert main(COMMANDS["prox"].fresh(out, shared_data)) == 2
        err = _error_line(capsys, "prox")
        assert f"is in use by another run (process {holder.pid} holds" in err
        assert not (out / "checkpoint.pt").exists()  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
    assert (out / "run.lock").read_text().strip() == str(holder.pid)
    assert main(COMMANDS["prox"].fresh(out, shared_data)) == 0
    assert _tensors_equal(COMMANDS["prox"].outcome(out), reference("prox").outcome)


def test_the_lock_is_exclusive_between_processes_and_released_at_the_end(tmp_path):
    from bilevel.runner.lock import FolderLocked, OutputLock

    with OutputLock(tmp_path):
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())
        code = ("import sys; from bilevel.runner.lock import OutputLock, FolderLocked\n"
                "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept FolderLocked as e:\n    print(e)")
        refused = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert f"process {os.getpid()} holds" in refused.stdout  # another process cannot take it meanwhile
    other = _holder(tmp_path)  # released: another process takes it
    try:
        with pytest.raises(FolderLocked, match=f"process {other.pid} holds"):
            OutputLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------- the checkpoint file format


def test_save_keeps_the_previous_checkpoint_unless_it_is_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2):
        checkpoint.save({"step": step, "x": torch.arange(3.0) * step}, path)
    prev = checkpoint.previous_path(path)
    assert prev.name == "checkpoint.prev.pt"
    assert checkpoint.load(path)["step"] == 2 and checkpoint.load(prev)["step"] == 1
    _flip(path, random.Random(1))
    checkpoint.save({"step": 3}, path)  # the damaged step-2 file is not kept as the previous one
    assert checkpoint.load(path)["step"] == 3 and checkpoint.load(prev)["step"] == 1
    prev.unlink()
    os.link(path, prev)  # a save killed after keeping the previous checkpoint, before its own rename
    checkpoint.save({"step": 4}, path)
    assert checkpoint.load(prev)["step"] == 3 and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match=r"no previous checkpoint at .*other\.prev\.pt"):
        checkpoint.load_for_resume(tmp_path / "other.pt", "previous")


def _saved(payload: Any) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        checkpoint.save(payload, path)
        return path.read_bytes()


_SAMPLE = _saved({"step": 7, "theta": torch.linspace(0, 1, 50), "rng": {"state": 2**100}})


@given(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 7))
def test_every_flipped_bit_is_detected(tmp_path_factory, position, bit):
    path = tmp_path_factory.getbasetemp() / "flipped.pt"
    data = bytearray(_SAMPLE)
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} is") as err:
        checkpoint.load(path)
    assert "start over with --overwrite" in str(err.value)


@given(st.integers(0, len(_SAMPLE) - 1))
def test_every_truncation_is_detected(tmp_path_factory, length):
    path = tmp_path_factory.getbasetemp() / "truncated.pt"
    path.write_bytes(_SAMPLE[:length])
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} is (empty|truncated|damaged)"):
        checkpoint.load(path)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("step,loss\n1,0.5\n")
    with pytest.raises(CheckpointError, match="is not a bilevel checkpoint"):
        checkpoint.load(path)
    path.write_bytes(_SAMPLE)
    assert checkpoint.load(path)["rng"] == {"state": 2**100}  # big Python ints survive weights_only


@given(st.lists(st.dictionaries(st.sampled_from("abc"), st.integers()), min_size=1, max_size=5), st.data())
def test_a_log_cut_by_a_kill_keeps_its_complete_records(tmp_path_factory, records, data):
    records = [{"step": i, **r} for i, r in enumerate(records)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    cut = data.draw(st.integers(0, len(text)))
    path = tmp_path_factory.getbasetemp() / "log.jsonl"
    path.write_text(text[:cut])
    complete = text[:cut].count("\n")
    kept = read_records(path)
    assert kept[:complete] == records[:complete] and len(kept) - complete in (0, 1)
    assert read_records(path, upto=1) == [r for r in kept if r["step"] <= 1]


# ---------------------------------------------------------------- item 9: damaged data archives


def _deflated_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)


def _raw_zip_error(data: bytes) -> type | None:
    """What reading every member of the zip ``data`` raises (None: nothing)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                archive.read(name)
    except Exception as err:  # noqa: BLE001 - the point is to see every kind
        return type(err)
    return None


def test_a_damaged_omniglot_zip_is_named_with_the_fix(tmp_path, capsys):
    from bilevel.problems.imaml.omniglot import OmniglotError, locate_archive

    rng = random.Random(9)
    members = {f"images_background/Alpha/character01/{i:04d}_01.png": bytes(rng.randrange(4) for _ in range(400))
               for i in range(4)}
    source = tmp_path / "clean.zip"
    _deflated_zip(source, members)
    path = tmp_path / "images_background.zip"
    raw_kinds = set()
    for _ in range(40):  # seeded flips anywhere in the file: never a raw zlib.error or BadZipFile
        shutil.copyfile(source, path)
        _flip(path, rng)
        raw_kinds.add(_raw_zip_error(path.read_bytes()))
        with pytest.raises(OmniglotError) as err:
            locate_archive("images_background.zip", tmp_path, download=False)
        assert str(path) in str(err.value)
        assert "delete it" in str(err.value) or "Replace it" in str(err.value)
    assert zlib.error in raw_kinds  # the case of the issue was among them
    # through the command: one line, the file and the fix
    clean = source.read_bytes()
    start = clean.index(b"0000_01.png") + len(b"0000_01.png")  # the first member's deflate stream
    for offset in range(start, start + 64):
        data = bytearray(clean)
        data[offset] ^= 0xFF
        if _raw_zip_error(bytes(data)) is zlib.error:
            break
    else:
        pytest.fail("no flip in the deflate stream gave a zlib.error")
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["imaml", "--dataset", "omniglot", "--data-dir", str(tmp_path), "--cache-dir",
                 str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = _error_line(capsys, "imaml")
    assert f"{path} is not a readable zip archive (error: Error -3" in err and "delete it" in err


_BANK_HEADER = ("age;job;marital;education;default;housing;loan;contact;month;day_of_week;duration;campaign;pdays;"
                "previous;poutcome;emp.var.rate;cons.price.idx;cons.conf.idx;euribor3m;nr.employed;y")


def _bank_zip(root: Path, rng: random.Random) -> Path:
    rows = [f"{rng.randint(18, 80)};admin.;married;basic.4y;no;yes;no;telephone;may;mon;100;1;999;0;"
            f"nonexistent;1.1;93.9;-36.4;4.8;5191;{rng.choice(['yes', 'no'])}" for _ in range(60)]
    path = root / "bank_marketing" / "bank-additional.zip"
    _deflated_zip(path, {"bank-additional/bank-additional-full.csv": "\n".join([_BANK_HEADER, *rows]).encode()})
    return path


def test_damaged_bank_zip_and_csv_files_are_named_by_both_loaders(tmp_path):
    from bilevel.problems.datafiles import DataFileError
    from bilevel.problems.fair.data import load_tasks
    from bilevel.problems.hyperparameter.tabular import load_tabular

    rng = random.Random(4)
    path = _bank_zip(tmp_path, rng)
    clean = path.read_bytes()
    assert load_tabular("bank", tmp_path).x.shape[0] == 60
    broken = 0
    for _ in range(30):
        path.write_bytes(clean)
        _flip(path, rng)
        if _raw_zip_error(path.read_bytes()) is None:
            continue  # a flip in a field no reader checks
        broken += 1
        for load in (lambda: load_tabular("bank", tmp_path), lambda: load_tasks("bank", tmp_path)):
            with pytest.raises(DataFileError, match=f"{re.escape(str(path))} (is damaged|does not hold).*copy or"):
                load()
    assert broken >= 10
    lsac = tmp_path / "pdfm" / "lsac.csv"
    lsac.parent.mkdir()
    lsac.write_text("grp,z,y,x1\n1,0,0.5,0.1\n1,1,0.7,0.4x\n")  # one value damaged
    with pytest.raises(DataFileError, match=f"{re.escape(str(lsac))} could not be parsed .*could not convert"):
        load_tasks("lsac", tmp_path)


def test_a_damaged_mnist_gzip_is_named_with_the_fix(tmp_path):
    from bilevel.problems.hyperparameter.mnist import read_idx

    rng = random.Random(5)
    raw = bytes([0, 0, 8, 1, 0, 0, 1, 0]) + bytes(rng.randrange(256) for _ in range(256))
    clean = gzip.compress(raw)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    for _ in range(40):
        data = bytearray(clean)
        data[rng.randrange(10, len(data))] ^= 1 << rng.randrange(8)  # past the gzip header
        path.write_bytes(bytes(data))
        try:
            values = read_idx(path)
        except ValueError as err:
            assert str(path) in str(err)
        else:
            assert values.numel() == 256  # the flip hit a byte gzip ignores


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1:]))
