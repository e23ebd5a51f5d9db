"""User-facing errors and exit codes: one clear line, non-zero exit, no traceback.

Library code raises :class:`UserError` for bad input (unknown names, bad values, broken
checkpoints, missing data offline, NaN losses). The entry point catches it, logs the message
as a single line and exits with :data:`EXIT_USER_ERROR`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or an unrecoverable run condition the user can fix; the message says how."""


class NonFiniteLossError(UserError):
    """A training loss became NaN/inf; the last good state is kept."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what the entry point needs to say how to resume it.

    Attributes:
        out_dir: the run directory.
        done: continual steps completed and checkpointed (0 = none).
        total: steps in the run.
        resumable: a checkpoint of step ``done`` exists (continual protocol, ``keep_checkpoints`` not none).
    """

    def __init__(self, out_dir: str, done: int, total: int, resumable: bool) -> None:
        super().__init__(f"interrupted after step {done} of {total}")
        self.out_dir, self.done, self.total, self.resumable = out_dir, done, total, resumable


_INTERRUPT = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _INTERRUPT.set()
    raise KeyboardInterrupt


def watch_interrupts() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual and is also remembered: native code (safetensors,
    torch) may turn the exception into an error of its own, which the runner then reports as the
    interrupt it was (:func:`interrupted`), not as a broken file. Called by the entry point."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed in this process (see :func:`watch_interrupts`)."""
    return _INTERRUPT.is_set()
