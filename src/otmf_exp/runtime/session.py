"""Process-level setup of one run: seeding, the device, torch's threads, the run's log file."""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmf_exp.errors import UserError

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: backbone kinds whose matrices are too small for a second intra-op thread to pay (the tiny
#: digits tower: one training step 174 ms at 1 thread, 2,698 ms at 2 on a shared 2-core box)
SMALL_BACKBONES = ("tiny",)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota)) if quota else max(1, n)


def _cgroup_quota() -> int | None:
    try:
        q, p = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if q != "max":
            return max(1, math.floor(int(q) / int(p)))
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return max(1, math.floor(q / p))
    except (OSError, ValueError):
        pass
    return None


def resolve_threads(value: Any, backbone_kind: str = "", jobs: int = 1) -> int:
    """``threads``: an int ≥ 1 as given, or ``auto`` = the CPUs this process may use divided by the
    sweep jobs running at once (joblib ``n_jobs``), and 1 for the tiny digits tower."""
    if value != "auto":
        return int(value)
    if backbone_kind in SMALL_BACKBONES:
        return 1
    return max(1, available_cpus() // max(1, int(jobs)))


def apply_threads(n: int) -> None:
    """torch's intra-op threads for this process (inter-op stays torch's default)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after (the digits zoo is built
    at 1 thread, so its files are the same bytes whatever the thread count of the run that builds it)."""
    before = torch.get_num_threads()
    apply_threads(n)
    try:
        yield
    finally:
        apply_threads(before)


def check_device(name: str) -> None:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, and available on this machine."""
    if not _DEVICE.match(name):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device=mps but MPS is not available; use device=cpu or device=auto")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (``seed`` ≥ 0; numpy takes it modulo 2³²)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; any other name is checked (one-line error)."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _NoFollowFileHandler(logging.FileHandler):
    """A ``FileHandler`` (append) that never opens its file through a symbolic link."""

    def _open(self):  # type: ignore[no-untyped-def]
        from otmf_exp.runtime.files import open_nofollow

        fd = open_nofollow(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def attach_log_file(out_dir: Path) -> logging.Handler | None:
    """Log to ``<out_dir>/run.log`` (INFO and up) until the handler is removed; None when a handler
    for that file is attached already."""
    root = logging.getLogger()
    path = (out_dir / "run.log").resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return None
    h = _NoFollowFileHandler(out_dir / "run.log")
    h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
