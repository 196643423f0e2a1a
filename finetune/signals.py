"""SIGTERM and SIGINT ask a run to stop at the end of its current step, not in the middle of it.

A cluster preempting a job sends SIGTERM (and SIGKILL a grace period later); a user presses
Ctrl-C. Either way the handler only records the signal; the loop checks it once per step, saves a
full checkpoint and exits with 128 + the signal number, as a shell reports a process killed by it.
A second signal of either kind stops the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set `received` instead of ending the process."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Python delivers signals to the main thread only; from any other thread (a notebook
        # worker, say) the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None:
            # Asked twice: the user does not want to wait for the step and the checkpoint.
            print(f"\nfinetune: {signal.Signals(signum).name} again, stopping now without a checkpoint",
                  file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\nfinetune: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
