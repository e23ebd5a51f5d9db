"""User-facing errors and exit codes: one clear line, non-zero exit, no traceback.

Library code raises :class:`UserError` for bad input (unknown names, bad values, broken
checkpoints, missing data offline, NaN losses). The entry point catches it, logs the message
as a single line and exits with :data:`EXIT_USER_ERROR`.
"""

from __future__ import annotations

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
