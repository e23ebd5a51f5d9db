"""Content identity of every model file a run reads: streamed sha256, cached by the file's stat stamp.

:func:`file_digest` hashes a file once; later calls with the same real path, inode, size, mtime_ns and
ctime_ns read the digest (a rewrite that keeps the old mtime, ``cp -p`` / ``rsync -t`` / ``touch -r``,
still changes ctime, which no user call can set back, so it is re-hashed) from ``$OTMF_EXP_CACHE/digests.json`` (written atomically). :func:`collecting` gathers the
digests of the model files read inside it (the zoo and the hub resolver call :func:`record`), so the
runner can name θ₀ and each θ_t by content (its ``ModelIdentity``: ``{"pretrained": sha, task: sha}``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK = 1 << 20
#: weight files of a model directory (a directory's digest is over these files' digests)
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")
#: how many files were actually hashed (not served from the cache); tests count it
HASHED = [0]

_CURRENT: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("otmf_digests", default=None)


def _cache_file() -> Path:
    root = Path(os.environ.get("OTMF_EXP_CACHE", Path.home() / ".cache" / "otmf_exp"))
    return root / "digests.json"


def read_map(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_map(path: Path, data: dict[str, list]) -> None:
    """Best effort, atomic (temp file + rename): a read-only cache only costs a re-hash next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    HASHED[0] += 1
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of ``path``'s bytes; cached by (real path, inode, size, mtime_ns, ctime_ns)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = _cache_file()
    data = read_map(cache)
    hit = data.get(real)
    if isinstance(hit, list) and len(hit) == len(stamp) + 1 and hit[:-1] == stamp:
        return str(hit[-1])
    sha = sha256_file(Path(real))
    data = read_map(cache)  # another process may have added entries meanwhile
    data[real] = [*stamp, sha]
    write_map(cache, data)
    return sha


def combine(digests: Iterable[tuple[str, str]]) -> str:
    """One digest over ``(name, sha)`` pairs (sorted by name)."""
    return hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in sorted(digests)).encode()).hexdigest()


def dir_digest(path: str | Path, patterns: Iterable[str] = WEIGHTS) -> str:
    """A digest over the digests of the weight files in directory ``path`` (names relative to it)."""
    p = Path(path)
    found = sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file()})
    return combine((str(f.relative_to(p)), file_digest(f)) for f in found)


def short(sha: str | None) -> str:
    return (sha or "<none>")[:12]


def record(path: str | Path) -> str:
    """The digest of model file/dir ``path``, added to the collector of :func:`collecting` (if any)."""
    p = Path(path)
    sha = dir_digest(p) if p.is_dir() else file_digest(p)
    got = _CURRENT.get()
    if got is not None:
        got.append(sha)
    return sha


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Collect the digests :func:`record`\\ ed inside the block (in order)."""
    got: list[str] = []
    token = _CURRENT.set(got)
    try:
        yield got
    finally:
        _CURRENT.reset(token)


def identity_of(digests: list[str]) -> str | None:
    """One digest for what a load read: the file's, or a digest over several; None when none."""
    uniq = list(dict.fromkeys(digests))
    if not uniq:
        return None
    return uniq[0] if len(uniq) == 1 else combine((str(i), s) for i, s in enumerate(uniq))
