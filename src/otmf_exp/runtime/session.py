"""Process-level setup of one run: seeding, the device, the run's log file."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from otmf_exp.errors import UserError

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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


def attach_log_file(out_dir: Path) -> logging.Handler | None:
    """Log to ``<out_dir>/run.log`` (INFO and up) until the handler is removed; None when a handler
    for that file is attached already."""
    root = logging.getLogger()
    path = (out_dir / "run.log").resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return None
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
