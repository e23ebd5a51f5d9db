"""The one writer: atomic, never through a link (a reader never sees a half-written result), strict JSON.

Every file an entry point writes (a run's results, ``make_tables``, ``plot.py``, exports) goes
through :func:`atomic_path`: the name and the directory it is written into must not be symbolic
links (one :class:`UserError` line), the bytes go to a temp file beside it, renamed over the name.

JSON written here is strict (RFC 8259: no ``NaN`` / ``Infinity`` tokens): a non-finite float is
written as ``null`` and logged as a warning naming its key (:func:`finite_or_null`). A failed
write (full disk, permissions) is a :class:`UserError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from otmf_exp.errors import UserError
from otmf_exp.runtime.results import WRITTEN

log = logging.getLogger(__name__)


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: Path) -> str:
    """A new empty temp file beside ``path`` with the mode a plain ``open`` would give it (0666 less
    the umask: mkstemp's 0600 would make results unreadable for a collaborator sharing the dir)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the same directory; rename it onto ``path`` on success (``OSError`` as
    raised: callers that can go on without the file catch it; :func:`write_text` turns it into a
    :class:`UserError`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_target(path)
    tmp = temp_file(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_target(path: Path) -> None:
    """One :class:`UserError` line when ``path`` or the directory it is written into is a symbolic
    link (a write would land in the link's target, outside where it was asked to go)."""
    for p, what in ((path, "file"), (path.parent, "directory")):
        if p.is_symlink():
            raise UserError(
                f"{p} is a symbolic link (to {os.readlink(p)}); otmf_exp never writes through links: "
                f"remove the link or give the real {what} ({os.path.realpath(p)})"
            )


def write_error(path: str | Path, e: BaseException, fix: str | None = None) -> UserError:
    """One line for a failed write of ``path``: the reason and the fix (free space / permissions).
    ``e`` may be an ``OSError`` or a library's wrapper of one (safetensors' ``SafetensorError``)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = e.strerror if isinstance(e, OSError) and e.strerror else text
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
        s in text for s in ("StorageFull", "No space left", "QuotaExceeded", "Disk quota")
    )
    if fix is None:
        fix = "free space on its disk and rerun" if full else "make its directory writable or write elsewhere"
    elif full:
        fix = f"free space on its disk; {fix}"
    return UserError(f"cannot write {path} ({reason}); {fix}")


def write_text(path: str | Path, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise write_error(path, e) from None


def strict_dumps(obj: Any, where: str = "", **kwargs: Any) -> str:
    """``json.dumps`` with non-finite floats as ``null`` (warned about, naming ``where`` and the
    key) and ``allow_nan=False``, so the text is strict JSON."""
    bad: list[str] = []
    clean = finite_or_null(obj, bad)
    if bad:
        log.warning("%s: non-finite values written as null: %s", where or "JSON", ", ".join(bad[:10]))
    return json.dumps(clean, allow_nan=False, default=_default, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, strict_dumps(obj, str(path), indent=2) + "\n")


def write_jsonl(path: str | Path, records: list[Any]) -> None:
    """One strict-JSON line per record (atomic)."""
    write_text(path, "".join(strict_dumps(r, str(path)) + "\n" for r in records))


def write_safetensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Save ``tensors`` atomically; a failed write is a :class:`UserError` naming ``path``."""
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    except Exception as e:  # OSError or safetensors' wrapper of one (full disk)
        raise write_error(path, e) from None


def finite_or_null(obj: Any, bad: list[str] | None = None, path: str = "") -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, numbers, tensors/arrays' ``.item()``) with every
    NaN / ±inf replaced by ``None``; the dotted keys replaced are appended to ``bad``."""
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, RuntimeError):  # a multi-element tensor/array: serialise as a list
            obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        if bad is not None:
            bad.append(path or "<value>")
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v, bad, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v, bad, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 -> what mkdir gives
    try:
        yield tmp
        if path.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(staged: str | Path, out: str | Path) -> None:
    """Move the complete directory ``staged`` to ``out`` (same file system); an existing ``out`` is
    moved aside first and deleted only once the new one is in place."""
    staged, out = Path(staged), Path(out)
    old = out.with_name(f".{out.name}.old")
    _remove(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


#: the names a run writes in its directory (declared once, in :mod:`otmf_exp.runtime.results`)
RUN_NAMES = WRITTEN


def refuse_links(out_dir: Path) -> None:
    """One :class:`UserError` line when a name the run writes in ``out_dir`` (:data:`RUN_NAMES`, and
    each ``checkpoints/step_XXX``) is a symbolic link: a run never writes, appends or deletes through
    a link (it would truncate the link's target, or delete files outside ``out_dir``)."""
    if out_dir.is_symlink():  # e.g. a sweep job dir planted as a link: the whole run would land elsewhere
        raise UserError(
            f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}); a run never writes through links: "
            f"remove the link or give the real directory ({os.path.realpath(out_dir)})"
        )
    names = [out_dir / n for n in RUN_NAMES]
    ckpt = out_dir / "checkpoints"
    if ckpt.is_dir() and not ckpt.is_symlink():
        names += sorted(ckpt.glob("step_*"))
    for path in names:
        if path.is_symlink():
            raise UserError(
                f"{path} is a symbolic link (to {os.readlink(path)}); a run never writes through links: "
                "remove the link or choose another out_dir"
            )


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a symbolic link at ``path`` is a :class:`UserError`, never followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; a run never writes through links: remove it or choose another out_dir"
            ) from None
        raise


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir``, refuse links among the names the run writes (:func:`refuse_links`) and
    prove a file can be written there."""
    refuse_links(out_dir)
    probe = out_dir / f".write_probe_{uuid.uuid4().hex}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as e:
        fix = (
            "free space on its disk or set out_dir="
            if e.errno == errno.ENOSPC
            else "set out_dir= or hydra.run.dir="
        )
        raise UserError(f"output directory {out_dir} is not writable ({e.strerror}); {fix}") from None
    finally:
        with contextlib.suppress(
            OSError
        ):  # also when the write failed half-way (a full disk leaves the name)
            probe.unlink(missing_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable; set out_dir= or hydra.run.dir=")
    refuse_links(out_dir)
