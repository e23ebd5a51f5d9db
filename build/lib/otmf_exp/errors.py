"""User-facing errors: one clear line, non-zero exit, no traceback.

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
