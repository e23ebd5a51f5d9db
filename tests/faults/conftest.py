"""Fault-injection fixtures (issue 27 item 8): a private copy of the cached digits8 zoo to tamper
with, a CLI runner returning ``(exit code, stdout, stderr lines)`` (in-process, or in a
subprocess for what needs a process: an ASCII-only or closed stdout, Ctrl-C), the environments
(ASCII stdout, no W&B key) and a check that planted files are left untouched."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: a run on two of the digits8 tasks (seconds)
RUN = ["progress=false", "method=averaging", "task_order=[rot90,rot180]"]

Result = tuple[int, str, list[str]]


def lines(text: str) -> list[str]:
    return [s for s in text.splitlines() if s.strip()]


def one_error(err: list[str], code: int, rc: int, text: str | None = None) -> str:
    """Assert the outcome of a failure: exit ``code``, no traceback, stderr ending with one
    ``error:`` line (containing ``text``); returns that line."""
    assert rc == code, (rc, err[-20:])
    assert not any("Traceback" in s for s in err), err[-20:]
    assert err and err[-1].startswith("error: "), err[-20:]
    assert sum(s.startswith("error: ") for s in err) == 1, err
    if text is not None:
        assert text in err[-1], err[-1]
    return err[-1]


@pytest.fixture
def zoo_copy(zoo, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the cached digits8 zoo under ``tmp_path`` (OTMF_EXP_CACHE points at it, also for
    subprocesses): tamper with its files without touching the shared cache. Returns the zoo dir."""
    cache = tmp_path / "cache"
    dest = cache / zoo.dir.name
    shutil.copytree(zoo.dir, dest)
    monkeypatch.setenv("OTMF_EXP_CACHE", str(cache))
    return dest


@pytest.fixture
def run_cli(capsys, monkeypatch) -> Callable[..., Result]:
    """``run_cli(main, *argv)`` calls a CLI in-process and returns ``(exit code, stdout, stderr
    lines)``. ``main`` takes ``argv`` (zoo, make_tables, prefetch) or reads ``sys.argv``
    (``otmf_exp.run.main``, pass ``argv_from_sys=True``). The SIGINT handler, logging's
    ``raiseExceptions`` and HYDRA_FULL_ERROR are restored afterwards."""

    def _run(main: Callable, *argv: str, argv_from_sys: bool = False) -> Result:
        capsys.readouterr()
        handler, raise_exc = signal.getsignal(signal.SIGINT), logging.raiseExceptions
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # a CLI's logging.basicConfig binds this test's stderr
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            if argv_from_sys:
                monkeypatch.setattr(sys, "argv", ["otmf_exp.run", *argv])
                code = main()
            else:
                code = main(list(argv))
        except SystemExit as e:
            code = e.code
        finally:
            signal.signal(signal.SIGINT, handler)
            logging.raiseExceptions = raise_exc
            root.handlers[:], root.level = handlers, level
        out = capsys.readouterr()
        return int(code or 0), out.out, lines(out.err)

    return _run


@pytest.fixture
def run_main(run_cli) -> Callable[..., Result]:
    """``run_main(*overrides)``: ``python -m otmf_exp.run`` in-process (see :func:`run_cli`)."""
    from otmf_exp import run

    return lambda *argv: run_cli(run.main, *argv, argv_from_sys=True)


def subprocess_cli(cmd: list[str], env: dict[str, str] | None = None, shell_tail: str = "") -> Result:
    """Run ``cmd`` in a process (``shell_tail``, e.g. ``| head -c 0``, is appended in bash; the
    exit code is then the command's, not the pipe's)."""
    full = {**os.environ, **(env or {})}
    if shell_tail:
        script = f'"$@" {shell_tail}; exit "${{PIPESTATUS[0]}}"'
        p = subprocess.run(
            ["bash", "-c", script, "x", *cmd], capture_output=True, text=True, env=full, timeout=300
        )
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)
    return p.returncode, p.stdout, lines(p.stderr)


#: environments that break the console or the tracker
ASCII_STDOUT = {"PYTHONIOENCODING": "ascii", "LANG": "C", "LC_ALL": "C"}
NO_WANDB_KEY = {"WANDB_API_KEY": "", "WANDB_MODE": "online", "NETRC": "/nonexistent"}


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path: Path) -> None:
    """No W&B key anywhere (env, ~/.netrc, settings): an online W&B start must fail."""
    from otmf_exp.offline.zoo import cache_root

    monkeypatch.setenv("OTMF_EXP_CACHE", str(cache_root()))  # the zoo stays where it is (HOME moves)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))


def tree_digest(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file (and ``-> link target`` of every link) under ``root``."""
    out: dict[str, str] = {}
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


@contextmanager
def untouched(*roots: Path) -> Iterator[None]:
    """Assert that every file under ``roots`` (planted by the test) is unchanged by the block."""
    before = {str(r): tree_digest(r) for r in roots}
    yield
    after = {str(r): tree_digest(r) for r in roots}
    assert after == before, "planted files changed"
