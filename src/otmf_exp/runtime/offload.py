"""Tensors that wait off the device between their uses (``method.offload`` of OTMF).

A runtime service, not merging maths (``merging/`` does no I/O): OTMF's masks hand what they do not
need until later to a :class:`HostStore` —

* :class:`OffloadedMoments`: the Adam moments of each (side, transformer layer) group of mask
  tensors (``merging/otmf/ot_masks.py: BackwardAdam``). A group's ``exp_avg`` and ``exp_avg_sq`` are
  read into one staging buffer (the largest group's size, ≈ 57 MB at ViT-B/32) just before its
  fused Adam step and written back right after it, so one group's moments are on the device
  instead of both sides' (4 W);
* :class:`SpilledCopy`: the copy of a mask that ``select=authors`` keeps as the best one
  (``best_masks=on_write`` / ``copy``), written once and read back once at the end, so holding it
  costs no device memory and ``on_write`` never falls back to replaying iterations.

Where they wait: pinned host memory when the tensors are on a CUDA device; on the CPU an anonymous
temporary file (``O_TMPFILE``: no name, nothing left behind even after ``kill -9``), preallocated
when it is made (a full disk is one line then, not a failure mid-step). The bytes round-trip
exactly, so the results are bit-identical. On the CPU the file's pages may stay in the kernel's page
cache: the process's RSS no longer holds them and the kernel evicts them under memory pressure (the
reads then run at the disk's speed). A directory on a tmpfs keeps them in RAM, which saves nothing;
that is warned about.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)

#: file systems whose files live in RAM (an offload there frees nothing)
RAM_FS = ("tmpfs", "ramfs")


def _filesystem(path: Path) -> str | None:
    """The type of the file system that holds ``path`` (longest mount point of /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best = str(path.resolve()), (None, -1)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > best[1]:
            best = (parts[2], len(mnt))
    return best[0]


def ram_backed(directory: str | None) -> bool:
    """Whether ``directory`` (None: ``$TMPDIR``) is on a file system that lives in RAM."""
    return _filesystem(Path(directory or tempfile.gettempdir())) in RAM_FS


def disk_room_mb(directory: str | None) -> float | None:
    """Free space (MB) of ``directory`` (None: ``$TMPDIR``) for an unprivileged writer; None if it is
    not a directory."""
    d = Path(directory or tempfile.gettempdir())
    if not d.is_dir():
        return None
    return shutil.disk_usage(d).free / 2**20


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def _full(op, fd: int, view: memoryview, offset: int, what: str) -> None:
    """``os.pwrite`` / ``os.preadv`` until every byte of ``view`` is done (they may do fewer)."""
    done = 0
    while done < len(view):
        n = op(fd, view[done:], offset + done)
        if n <= 0:
            raise UserError(f"offload: the temporary file ended early while {what}; check the disk")
        done += n


def _bytes(t: Tensor) -> memoryview:
    return memoryview(t.detach().numpy()).cast("B")


class HostStore:
    """Room for ``numel`` float32 values off the device: ``store`` = ``host`` (host memory, pinned
    where CUDA is available; the default for a CUDA ``device``) | ``file`` (an anonymous temporary
    file in ``directory``, default ``$TMPDIR``; the default on the CPU). ``seconds``: time spent in
    :meth:`write` / :meth:`read`. Use as a context manager, or :meth:`close`."""

    def __init__(
        self,
        numel: int,
        device: torch.device,
        directory: str | None = None,
        store: str | None = None,
        what: str = "tensors",
    ) -> None:
        self.device, self.bytes = torch.device(device), numel * 4
        self.seconds = 0.0
        self.host: Tensor | None = None
        self._file = None
        self.fd: int | None = None
        store = store or ("host" if self.device.type == "cuda" else "file")
        if store == "host":
            self.host = torch.empty(numel, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        else:
            self._open(Path(directory or tempfile.gettempdir()), what)

    def _open(self, d: Path, what: str) -> None:
        if not d.is_dir():
            raise UserError(f"method.offload_dir {d} is not a directory; create it or choose another")
        try:
            self._file = tempfile.TemporaryFile(dir=d, buffering=0)  # O_TMPFILE where Linux has it
            self.fd = self._file.fileno()
            os.posix_fallocate(self.fd, 0, max(self.bytes, 1))
        except OSError as e:
            self.close()
            if e.errno == errno.ENOSPC:
                raise UserError(
                    f"offload: no room for {what} ({self.bytes / 2**20:.0f} MB) in {d}; free space there "
                    f"or set method.offload_dir to another disk"
                ) from None
            raise UserError(
                f"offload: cannot make a temporary file in {d} ({e.strerror}); set method.offload_dir "
                f"to a writable directory"
            ) from None
        fs = _filesystem(d)
        if fs in RAM_FS:
            log.warning(
                "offload: %s is on a %s (RAM): %s stay in memory; set method.offload_dir to a "
                "directory on a disk",
                d,
                fs,
                what,
            )

    def write(self, offset: int, t: Tensor) -> None:
        """``t`` (contiguous float32) into elements ``offset..offset+t.numel()``."""
        t0 = time.perf_counter()
        if self.host is not None:
            self.host[offset : offset + t.numel()].copy_(t.detach().reshape(-1), non_blocking=True)
        else:
            _full(os.pwrite, self.fd, _bytes(t), offset * 4, "writing")
        self.seconds += time.perf_counter() - t0

    def read(self, offset: int, t: Tensor) -> None:
        """Elements ``offset..offset+t.numel()`` into ``t`` (contiguous float32), in place."""
        t0 = time.perf_counter()
        if self.host is not None:
            with torch.no_grad():
                t.view(-1).copy_(self.host[offset : offset + t.numel()], non_blocking=True)
        else:
            _full(_pread, self.fd, _bytes(t), offset * 4, "reading")
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.fd, self.host = None, None, None

    def __enter__(self) -> HostStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OffloadedMoments(HostStore):
    """The Adam moments of ``groups`` (lists of float32 mask tensors, one fused Adam each), one
    group's at a time on the device. :meth:`load` before a group's ``opt.step()`` (its moments
    into the staging buffer, as the state's ``exp_avg`` / ``exp_avg_sq`` views; zeros before its
    first step, as Adam's own initialisation), :meth:`store` after it (written back, the views
    dropped from the state, so none outlives the step)."""

    def __init__(
        self,
        groups: list[list[Tensor]],
        device: torch.device,
        directory: str | None = None,
        store: str | None = None,
    ) -> None:
        self.groups = groups
        self.sizes = [sum(p.numel() for p in g) for g in groups]
        self.offsets = [2 * sum(self.sizes[:i]) for i in range(len(groups))]  # elements, both moments
        super().__init__(2 * sum(self.sizes), device, directory, store, what="the Adam moments")
        self.stepped = [False] * len(groups)
        self.staging = torch.empty(2 * max(self.sizes, default=0), dtype=torch.float32, device=self.device)

    def load(self, i: int, opt: torch.optim.Optimizer) -> None:
        n = self.sizes[i]
        buf = self.staging[: 2 * n]
        if self.stepped[i]:
            self.read(self.offsets[i], buf)
        else:
            buf.zero_()  # Adam's initial moments (torch.zeros_like)
        pos = 0
        for p in self.groups[i]:
            state = opt.state[p]
            if "step" not in state:  # as torch's Adam makes it for fused / capturable
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            k = p.numel()
            state["exp_avg"] = buf[pos : pos + k].view_as(p)
            state["exp_avg_sq"] = buf[n + pos : n + pos + k].view_as(p)
            pos += k

    def store(self, i: int, opt: torch.optim.Optimizer) -> None:
        self.write(self.offsets[i], self.staging[: 2 * self.sizes[i]])
        self.stepped[i] = True
        for p in self.groups[i]:
            opt.state[p].pop("exp_avg", None)
            opt.state[p].pop("exp_avg_sq", None)


class SpilledCopy(HostStore):
    """One copy of a set of tensors (a mask's raw values), held off the device: :meth:`save`
    writes them, :meth:`load` reads them back into the same tensors, in place."""

    def __init__(
        self, like: Mapping[str, Tensor], device: torch.device, directory: str | None = None
    ) -> None:
        self.offsets, pos = {}, 0
        for k, v in like.items():
            self.offsets[k], pos = pos, pos + v.numel()
        super().__init__(pos, device, directory, what="the best masks' copy")

    def save(self, tensors: Mapping[str, Tensor]) -> None:
        for k, t in tensors.items():
            self.write(self.offsets[k], t)

    def load(self, tensors: Mapping[str, Tensor]) -> None:
        for k, t in tensors.items():
            self.read(self.offsets[k], t)


def total_seconds(stores: Iterable[HostStore | None]) -> float:
    return sum(s.seconds for s in stores if s is not None)
