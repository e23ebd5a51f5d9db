"""What code and machine produced a run: git sha, versions, command line, threads, device, host.

Recorded in ``metrics.json`` (``provenance``), in the W&B config and in every checkpoint
(``code_version``), so a table can tell two code versions apart and ``resume=true`` refuses to
continue a run with other code unless told ``resume_across_versions=true``.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: what a dirty checkout's diff covers: the code and configs a run executes
_CODE_PATHS = ("src", "conf", "pyproject.toml")


@lru_cache(maxsize=1)
def _git() -> dict[str, Any]:
    """sha and dirty state of the checkout the package runs from (editable installs); {} when the
    package is not a git checkout of this project (a wheel install)."""
    pkg = Path(__file__).resolve().parents[1]  # src/otmf_exp
    root = pkg.parents[1]
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():
        return {}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--", *_CODE_PATHS)
        untracked = git("ls-files", "--others", "--exclude-standard", "--", *_CODE_PATHS)
    except (OSError, subprocess.SubprocessError):
        return {}
    dirty = bool(diff or untracked)
    h = hashlib.sha256((diff + untracked).encode()).hexdigest()[:12]
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "code_version": f"{sha[:12]}+dirty.{h}" if dirty else sha[:12],
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str:
    """The git sha (with a digest of uncommitted changes) or, outside a checkout, the package version."""
    return _git().get("code_version") or f"otmf_exp=={_version('otmf_exp')}"


def _overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # Hydra not running (run_experiment called from Python)
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(threads: int, device: torch.device) -> dict[str, Any]:
    """The record of ``metrics.json``'s ``provenance`` (and the W&B config's)."""
    g = _git()
    return {
        "code_version": code_version(),
        "git_sha": g.get("git_sha"),
        "git_dirty": g.get("git_dirty"),
        "otmf_exp": _version("otmf_exp"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "open_clip": _version("open_clip_torch"),
        "python": platform.python_version(),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "overrides": _overrides(),
        "threads": threads,
        "device_name": device_name(device),
        "host": socket.gethostname(),
    }
