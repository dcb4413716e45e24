"""Graceful stop: SIGTERM or Ctrl-C ends a long command at the next step boundary.

A command wraps its work in :class:`GracefulStop`. While it is active, the
first SIGTERM or SIGINT only sets a flag; the training loops call
:func:`stop_requested` at every step boundary (a state they can checkpoint),
write their checkpoint and raise :class:`Stopped`. The command then prints the
command that resumes and exits with ``128 + signal number`` (the shell's
convention: 130 for Ctrl-C, 143 for SIGTERM). A second signal while the first
is being honoured restores the default behaviour at once (Ctrl-C raises
:class:`KeyboardInterrupt`), so an impatient user is never stuck.

Shared by ``bnao search``, ``bnao train`` and ``bnao rank``::

    with GracefulStop() as stop:
        try:
            run_the_work()            # loops call stop_requested() between steps
        except Stopped as stopped:
            print(f"stopped ({stopped}); resume with: ...")
            return stop.exit_code
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

_HANDLED = (signal.SIGTERM, signal.SIGINT)
_active: Optional["GracefulStop"] = None


class Stopped(Exception):
    """Raised at a step boundary after a stop was requested and the checkpoint was written.

    Args:
        where: Where the work stopped (e.g. ``"iteration 1, phase train, step 40"``).
    """

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def stop_requested() -> bool:
    """True when a SIGTERM or SIGINT arrived inside an active :class:`GracefulStop`."""
    return _active is not None and _active.signal_number is not None


def request_stop(signal_number: int = signal.SIGTERM) -> None:
    """Requests a stop as a signal would (for tests and for code that stops a run itself)."""
    if _active is not None:
        _active._on_signal(signal_number, None)


class GracefulStop:
    """Context manager turning SIGTERM/SIGINT into a flag checked at step boundaries.

    Outside the main thread (where Python cannot install handlers) it does
    nothing and signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._outer: Optional[GracefulStop] = None

    @property
    def signal_name(self) -> str:
        """``SIGTERM`` or ``SIGINT`` (empty when no stop was requested)."""
        return signal.Signals(self.signal_number).name if self.signal_number is not None else ""

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, the exit status shells give a process ended by that signal."""
        return 128 + int(self.signal_number or signal.SIGTERM)

    def _on_signal(self, signal_number: int, frame: Optional[FrameType]) -> None:
        if self.signal_number is not None:
            # Second signal: the user insists. Give the default behaviour back and act on it now.
            self._restore()
            if signal_number == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signal_number)
            return
        self.signal_number = signal_number

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        global _active
        if threading.current_thread() is threading.main_thread():
            for number in _HANDLED:
                self._previous[number] = signal.signal(number, self._on_signal)
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global _active
        self._restore()
        _active = self._outer
