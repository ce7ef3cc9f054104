"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, not an exception anywhere.

Python's default SIGINT handler raises KeyboardInterrupt in whatever Python code runs when the
signal lands: inside a garbage-collection callback of JAX it is printed and ignored (the run goes on),
inside an orbax save it tears the checkpoint. The CLIs instead install `StopOnSignal` around their
loop: the first SIGINT or SIGTERM only sets a flag, which the loop reads between steps, so it can
save a final checkpoint of the last finite state, write its summary and exit 130 (SIGINT) or 143
(SIGTERM). A second signal aborts at once (KeyboardInterrupt; checkpoints are written atomically, so
only complete ones remain).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["StopOnSignal", "EXIT_CODES"]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set `requested` (first time) or abort (second time).

    Attributes:
      signum: the first signal received, or None.
      message: printed to stderr on the first signal ('' for nothing).
    """

    def __init__(self, message: str = "stopping after the current step (press Ctrl-C again to abort)"):
        self.signum: int | None = None
        self.message = message
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1) if self.signum is not None else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: abort now
        self.signum = signum
        if self.message:
            print(f"\n{signal.Signals(signum).name}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
