"""One run per run folder: an exclusive lock file that names the run holding it.

Two runs writing into one output_dir delete each other's checkpoints and the last one silently
replaces the other's adapter, so a run takes `run_dir/.finetune.lock` before it reads or writes the
folder and removes it when it ends (normally, by an exception, or by the SystemExit a SIGTERM stop
raises). The file is created atomically (O_CREAT | O_EXCL) and holds pid, host, start time and
command. A lock whose process is gone (killed with -9, a crash of the machine) is stale: a new run on
the same host takes it over with a note. A lock from another host cannot be checked, so it is
refused with how to remove it by hand.

In a multi-process launch (torchrun, accelerate) only the main process takes the lock; the others
pass `main_process=False` and write nothing into the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from finetune.config import ConfigError

LOCK_NAME = ".finetune.lock"
# A lock file another process has created but not yet filled in; younger than this it counts as live.
_FILLING_GRACE_S = 10.0
_FILLING_WAIT_S = 3.0  # how long to wait for such a record to be filled in


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the lock's holder; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so count from its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunLock:
    """Context manager: hold the lock of `run_dir` (created if missing) while inside.

    Raises ConfigError (exit 2 from the CLI) if another live run holds it. With main_process=False it
    does nothing: the main process of the launch holds the lock for every rank.
    """

    def __init__(self, run_dir: Path, main_process: bool = True, command: Optional[list[str]] = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.main_process = main_process
        self.info: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(command if command is not None else sys.argv),
            "process_start": _process_start(os.getpid()),
            "token": secrets.token_hex(8),  # tells this lock from a later one of the same pid
        }
        self._created_dir = False
        self.held = False

    # ------------------------------------------------------------------------------------------ api

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; ConfigError naming the holder if a live run has it."""
        if not self.main_process:
            return
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        for _ in range(3):  # a lock may vanish between our create and our read; look again
            if self._create():
                self.held = True
                return
            holder = self._read()
            if holder is None:
                continue
            stale = self._stale_reason(holder)
            if stale and self._take_over(holder):
                print(f"finetune: took over the lock of {self.run_dir}: {stale}", file=sys.stderr, flush=True)
                self.held = True
                return
        raise ConfigError([f"output_dir {self.run_dir} is locked by another run that keeps changing; try again"])

    def release(self) -> None:
        """Remove the lock if this run still holds it; remove the run folder if this lock made it and it is empty."""
        if self.held:
            self.held = False
            try:
                if self._read() == self.info:  # never remove a lock someone else took over
                    self.path.unlink()
            except (OSError, ConfigError):
                pass
        if self._created_dir:
            self._created_dir = False
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only succeeds while empty: a launch refused before writing anything

    # -------------------------------------------------------------------------------------- helpers

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise ConfigError([f"output_dir {self.run_dir}: cannot create the run lock {self.path} ({e}); "
                               "pass an output_dir you can write to"]) from e
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Optional[dict[str, Any]]:
        """The holder's record; None if the lock is gone; ConfigError if it cannot be made sense of."""
        deadline = time.monotonic() + _FILLING_WAIT_S
        while True:
            try:
                text = self.path.read_text()
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            except OSError as e:
                raise self._refusal(f"its lock file {self.path} cannot be read ({e})") from e
            with contextlib.suppress(json.JSONDecodeError):
                holder = json.loads(text)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            if age >= _FILLING_GRACE_S:
                raise self._refusal(f"its lock file {self.path} is not a finetune lock record")
            if time.monotonic() > deadline:  # created an instant ago by a run still writing its record
                raise self._refusal("another run is taking its lock at this moment")
            time.sleep(0.05)

    def _stale_reason(self, holder: dict[str, Any]) -> Optional[str]:
        """Why `holder` no longer runs (the note printed on taking over), or ConfigError if it may run."""
        pid = holder["pid"]
        if holder.get("host") != self.info["host"]:
            raise self._refusal(
                f"it is locked by pid {pid} on host {holder.get('host')} (started {holder.get('started')}), "
                f"which this host ({self.info['host']}) cannot check"
            )
        if not _alive(pid):
            return f"its run (pid {pid}, started {holder.get('started')}) is no longer running"
        started = _process_start(pid)
        if holder.get("process_start") and started and started != holder["process_start"]:
            return f"its run (pid {pid}, started {holder.get('started')}) ended and the pid now belongs to another process"
        raise ConfigError([
            f"output_dir {self.run_dir} is in use by another run: pid {pid} on {holder.get('host')}, started "
            f"{holder.get('started')} ({holder.get('command')!r}). Wait for it to end or stop it (kill {pid}), "
            "or pass another output_dir=..."
        ])

    def _refusal(self, why: str) -> ConfigError:
        return ConfigError([
            f"output_dir {self.run_dir} may be in use by another run: {why}. If no run uses this folder any more, "
            f"remove the lock by hand (rm {self.path}) and launch again; or pass another output_dir=..."
        ])

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Replace the stale lock `stale` by ours; False if it changed meanwhile (another run took it)."""
        mine = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.{self.info['token']}")
        mine.write_text(json.dumps(self.info))
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            mine.unlink()
            return False
        try:
            # flock on the stale file serializes the takers; the kernel frees it if one dies. The
            # re-check reads the path, not the descriptor: after the first taker's rename the
            # others see its record there and give up.
            with contextlib.suppress(ImportError, OSError):  # no flock (Windows, some NFS): the re-check alone
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return False
            if current != stale:
                return False
            os.replace(mine, self.path)
            return True
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                mine.unlink()
