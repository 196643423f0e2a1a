"""finetune/runlock.py: one run per run folder; a dead run's lock is taken over, a live one refuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.checkpoint import verify_directory
from finetune.config import ConfigError
from finetune.runlock import LOCK_NAME, RunLock
from tests.conftest import ROOT, LiveCli, tiny_run_args


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped), so nothing runs under it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
              "command": "python -m finetune", "process_start": None, "token": "0"} | fields
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    return run_dir / LOCK_NAME


def test_lock_holds_the_run_and_is_removed_on_exit_and_on_errors(tmp_path):
    run_dir = tmp_path / "new" / "run"
    with RunLock(run_dir, command=["python", "-m", "finetune"]) as lock:
        record = json.loads((run_dir / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "python -m finetune" and record["started"]
        assert lock.held
    assert not (run_dir / LOCK_NAME).exists()
    assert not run_dir.exists()  # made by the lock and left empty: removed with it

    run_dir.mkdir(parents=True)
    for error in (RuntimeError("boom"), SystemExit(143)):  # SystemExit: how a SIGTERM stop ends a run
        with pytest.raises(type(error)), RunLock(run_dir):
            assert (run_dir / LOCK_NAME).exists()
            raise error
        assert not (run_dir / LOCK_NAME).exists()
    assert run_dir.exists()  # it was there before: kept


def test_a_second_run_is_refused_naming_the_live_one(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError) as err, RunLock(tmp_path):
            pass
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "in use" in message
        assert (tmp_path / LOCK_NAME).exists()  # the refused one did not remove the holder's lock
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_run_is_taken_over_with_a_note(tmp_path, capsys):
    stale = json.loads(write_lock(tmp_path).read_text())
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    note = capsys.readouterr().err
    assert "took over the lock" in note and f"pid {stale['pid']}" in note and "no longer running" in note
    assert not (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no takeover leftovers


def test_lock_of_a_reused_pid_is_stale(tmp_path, capsys):
    # The pid is alive (this process) but started at another time than the lock's run.
    write_lock(tmp_path, pid=os.getpid(), process_start="1")
    with RunLock(tmp_path):
        pass
    assert "the pid now belongs to another process" in capsys.readouterr().err


def test_lock_from_another_host_or_unreadable_is_refused_with_how_to_remove_it(tmp_path):
    lock = write_lock(tmp_path, host="elsewhere")
    with pytest.raises(ConfigError, match=f"pid .* on host elsewhere.*rm {lock}"):
        RunLock(tmp_path).acquire()
    lock.write_text("not json")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with pytest.raises(ConfigError, match=f"not a finetune lock record.*rm {lock}"):
        RunLock(tmp_path).acquire()
    assert lock.read_text() == "not json"  # refused: never removed


def test_other_ranks_take_no_lock(tmp_path):
    with RunLock(tmp_path / "run", main_process=False):
        assert not (tmp_path / "run").exists()


TAKER = """
import sys, time
from finetune.config import ConfigError
from finetune.runlock import RunLock
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(3)
except ConfigError as e:
    print("refused", e, flush=True)
"""


def test_racing_takers_of_a_stale_lock_one_wins(tmp_path):
    write_lock(tmp_path)
    start = time.time() + 4  # every taker starts its attempt at the same moment
    takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path), str(start)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [t.communicate(timeout=120) for t in takers]
    held = [t.pid for t, (out, _) in zip(takers, outs, strict=True) if out.startswith("held")]
    assert len(held) == 1, outs
    for t, (out, _) in zip(takers, outs, strict=True):
        if t.pid != held[0]:
            assert out.startswith("refused") and f"pid {held[0]}" in out, out
    assert not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------- real CLI


def lock_holder(run_dir: Path, runs: list[LiveCli], timeout: float = 300) -> int:
    """The pid of the run that holds the lock, once one of `runs` has taken it and written its record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = json.loads((run_dir / LOCK_NAME).read_text())["pid"]
            if pid in [r.process.pid for r in runs]:
                return pid
        except (OSError, ValueError, KeyError):
            pass
        if all(r.process.poll() is not None for r in runs):
            raise AssertionError("every run ended before taking the lock:\n" + runs[0].stderr[-3000:])
        time.sleep(0.01)
    raise AssertionError("no run took the lock")


def test_two_cli_runs_into_one_folder_the_second_is_refused(tiny_llama, instruction_file, cache_dir, tmp_path):
    out = tmp_path / "run"
    stale = json.loads(write_lock(out).read_text())  # both also race to take over a dead run's lock
    runs = [LiveCli(tiny_run_args(tiny_llama, instruction_file, out), cache_dir) for _ in range(2)]
    holder = lock_holder(out, runs)
    first = next(r for r in runs if r.process.pid == holder)
    second = next(r for r in runs if r is not first)
    # Hold the winner still while the other launch meets its lock, so the refusal cannot come late.
    os.kill(holder, signal.SIGSTOP)
    try:
        code = second.wait(timeout=300)
    finally:
        os.kill(holder, signal.SIGCONT)
    assert code == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert f"is in use by another run: pid {holder}" in second.stderr, second.stderr[-2000:]
    assert "training:" not in second.stderr  # refused before any step
    assert first.wait(timeout=600) == 0, first.stderr[-3000:]
    assert f"took over the lock of {out}" in first.stderr and f"pid {stale['pid']}" in first.stderr
    assert verify_directory(out / "adapter") == []
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_when_sigterm_stops_a_run(tiny_llama, instruction_file, cache_dir, tmp_path):
    out = tmp_path / "run"
    run = LiveCli(tiny_run_args(tiny_llama, instruction_file, out, "train.max_steps=500", "train.save_every=0"),
                  cache_dir)
    run.wait_until(lambda: run.steps_done() >= 1)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == run.process.pid
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 143, run.stderr[-3000:]
    assert not (out / LOCK_NAME).exists()
