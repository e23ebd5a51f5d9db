"""User-facing errors and exit codes: one clear line, non-zero exit, no traceback.

Library code raises :class:`UserError` for bad input (unknown names, bad values, broken
checkpoints, missing data offline, NaN losses). The entry point catches it, logs the message
as a single line and exits with :data:`EXIT_USER_ERROR`.
"""

from __future__ import annotations

import codecs
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
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


# ---- the one wrapper every CLI goes through (run, zoo, make_tables, plot, prefetch) ----------------

EXIT_OK, EXIT_CRASH = 0, 1

#: what the ASCII fallback writes for the few non-ASCII characters our tables and lines use
_ASCII = {
    "±": "+-",
    "Δ": "d",
    "—": "-",
    "–": "-",
    "…": "...",
    "×": "x",
    "→": "->",
    "θ": "theta",
    "↓": "v",
    "↑": "^",
}
_ASCII |= {"─": "-", "━": "-", "│": "|", "┃": "|", "·": ".", "≤": "<=", "≥": ">=", "✓": "ok", "✗": "x"}


def _ascii_fallback(e: UnicodeError) -> tuple[str, int]:
    if not isinstance(e, UnicodeEncodeError):
        raise e
    text = e.object[e.start : e.end]
    return "".join(_ASCII.get(c, "?") for c in text), e.end


codecs.register_error("otmf_ascii", _ascii_fallback)

#: skipped when a config error is put on one line
_CONFIG_NOISE = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
)


def one_line(e: BaseException) -> str:
    """``e`` (and, for a wrapped config error, its cause) as one line: OmegaConf's / Hydra's
    multi-line messages joined, their ``full_key:`` / ``object_type=`` trailers dropped."""
    out, seen, listing = "", set(), False
    for x in (e, e.__cause__):
        for raw in str(x).splitlines() if x is not None else []:
            line = raw.strip()
            if line.startswith("Config search path"):  # Hydra's list of where it looked
                break
            if not line or line.startswith(_CONFIG_NOISE) or line in seen:
                continue
            seen.add(line)
            item = listing and raw[:1].isspace()  # an indented list under "options:" -> "a, b"
            out += (", " if item and not out.endswith(":") else " ") + line if out else line
            listing = line.endswith(":") or item
    return out or type(e).__name__


def is_config_error(e: BaseException) -> bool:
    """An OmegaConf / Hydra error about the configuration (a bad override, an unknown resolver
    such as ``${eval:1}``, a missing ``???`` value, an unknown config group choice, a preset that
    is not valid YAML, e.g. one in a ``--config-dir``): bad input."""
    mod = type(e).__module__ or ""
    return mod.startswith(("omegaconf", "hydra.errors", "yaml.")) or type(e).__name__ in (
        "ConfigCompositionException",
        "MissingConfigException",
        "OverrideParseException",
    )


def os_error_line(e: OSError) -> str:
    """``<path>: <reason>`` for a file the command could not read or write."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def quiet_closed_stdout() -> None:
    """Flush stdout now; when its reader is gone (``| head``) or it is closed, point it at
    /dev/null so the interpreter's exit-time flush cannot turn a finished command into a failure."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def ascii_safe_stdout() -> None:
    """A console that cannot encode Unicode (``LANG=C``, ``PYTHONIOENCODING=ascii``) gets ASCII
    stand-ins (``±`` -> ``+-``) instead of a ``UnicodeEncodeError`` after the results were written."""
    for stream in (sys.stdout, sys.stderr):
        enc = str(getattr(stream, "encoding", "") or "").lower().replace("-", "").replace("_", "")
        if not enc.startswith("utf") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="otmf_ascii")
            except (OSError, ValueError):
                pass


def cli_main(
    fn: Callable[..., int | None],
    argv: list[str] | None = None,
    *,
    interrupted_line: Callable[[KeyboardInterrupt], str] | None = None,
) -> int:
    """Run a CLI's ``fn(argv)`` and return its exit code; every way it ends is one line on stderr:

    * :class:`UserError`, an OSError (``<path>: <reason>``), a config error (OmegaConf / Hydra):
      ``error: <line>``, exit 2;
    * Ctrl-C: ``interrupted`` (or ``interrupted_line(e)``), exit 130, no traceback;
    * a closed stdout (``| head``): exit 0 and no message, the output was written before printing;
    * anything else is a real crash (a bug): its traceback, exit 1.
    """
    for name in ("stdout", "stderr"):  # started with a closed stream (`>&-`): Python made it None
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the process)
    ascii_safe_stdout()
    try:
        rc = fn(argv) if argv is not None else fn()
    except UserError as e:
        rc = _fail(str(e), EXIT_USER_ERROR)
    except KeyboardInterrupt as e:
        rc = _fail(interrupted_line(e) if interrupted_line else "interrupted", EXIT_INTERRUPTED, prefix="")
    except BrokenPipeError:
        rc = EXIT_OK
    except SystemExit as e:  # argparse, or a CLI that exits itself: its code (a message is printed)
        rc = e.code if isinstance(e.code, int) or e.code is None else _fail(str(e.code), EXIT_CRASH, "")
    except Exception as e:
        if is_config_error(e):  # before OSError: Hydra's MissingConfigException is one
            rc = _fail(one_line(e), EXIT_USER_ERROR)
        elif isinstance(e, OSError):
            rc = _fail(os_error_line(e), EXIT_USER_ERROR)
        else:  # a real crash (a bug): its traceback, exit 1
            traceback.print_exc()
            rc = EXIT_CRASH
    quiet_closed_stdout()
    return int(rc or 0)


def _fail(line: str, code: int, prefix: str = "error: ") -> int:
    quiet_closed_stdout()
    try:
        print(f"{prefix}{line}", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return code
