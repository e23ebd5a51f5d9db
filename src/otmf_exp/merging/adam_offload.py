"""Adam moments kept off the device between their group's steps (``method.adam_offload`` of OTMF).

The masks' fused Adam is stepped one (side, transformer layer) group at a time
(:class:`~otmf_exp.merging.ot_masks.BackwardAdam`). With :class:`OffloadedMoments`, a group's
``exp_avg`` and ``exp_avg_sq`` live on the device only while that group steps: they are read into
one staging buffer (the largest group's size, ≈ 57 MB at ViT-B/32) just before the step and written
back right after it. Between steps they sit in a backing store: pinned host memory when the masks
are on a CUDA device, an anonymous temporary file (``O_TMPFILE``: no name, nothing left behind)
on the CPU. The bytes round-trip exactly and fused Adam's arithmetic is per element, so the masks
equal those of the resident optimiser bit for bit; 4 W (both sides' moments) leave the step's
peak for one read and one write of the trained side's moments (2 W) per iteration.

On the CPU the file's pages may stay in the kernel's page cache: the process's RSS no longer holds
them and the kernel evicts them under memory pressure (the reads then run at the disk's speed).
A directory on a tmpfs keeps them in RAM, which saves nothing; that is warned about.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
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


def _full(op, fd: int, view: memoryview, offset: int, what: str) -> None:
    """``os.pwrite`` / ``os.preadv`` until every byte of ``view`` is done (they may do fewer)."""
    done = 0
    while done < len(view):
        n = op(fd, view[done:], offset + done)
        if n <= 0:
            raise UserError(f"adam_offload: the temporary file ended early while {what}; check the disk")
        done += n


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


class OffloadedMoments:
    """The Adam moments of ``groups`` (lists of float32 mask tensors, one fused Adam each) in a
    backing store, one group's at a time on the device; use as a context manager (closes the store).
    ``store``: ``host`` (host memory, pinned where CUDA is available; the default on CUDA) | ``file``
    (the default on the CPU).

    :meth:`load` before a group's ``opt.step()`` (its moments into the staging buffer, as the
    state's ``exp_avg`` / ``exp_avg_sq`` views; zeros before its first step, as Adam's own
    initialisation), :meth:`store` after it (written back, the views dropped from the state).
    """

    def __init__(
        self,
        groups: list[list[Tensor]],
        device: torch.device,
        directory: str | None = None,
        store: str | None = None,
    ) -> None:
        self.groups = groups
        self.device = torch.device(device)
        self.sizes = [sum(p.numel() for p in g) for g in groups]
        self.offsets = [2 * sum(self.sizes[:i]) for i in range(len(groups))]  # elements, both moments
        total = 2 * sum(self.sizes)
        self.bytes = total * 4
        self.seconds = 0.0
        self.stepped = [False] * len(groups)
        self.staging = torch.empty(2 * max(self.sizes, default=0), dtype=torch.float32, device=self.device)
        self.fd: int | None = None
        self._file = None
        self.host: Tensor | None = None
        store = store or ("host" if self.device.type == "cuda" else "file")
        if store == "host":  # page-locked where a CUDA device is there to copy from
            self.host = torch.empty(total, dtype=torch.float32, pin_memory=torch.cuda.is_available())
            self.where = "pinned host memory"
        else:
            self._open(Path(directory or tempfile.gettempdir()), total * 4)

    def _open(self, d: Path, nbytes: int) -> None:
        if not d.is_dir():
            raise UserError(f"method.offload_dir {d} is not a directory; create it or choose another")
        try:
            self._file = tempfile.TemporaryFile(dir=d, buffering=0)  # O_TMPFILE where Linux has it
            self.fd = self._file.fileno()
            os.posix_fallocate(self.fd, 0, max(nbytes, 1))
        except OSError as e:
            self.close()
            if e.errno == errno.ENOSPC:
                raise UserError(
                    f"adam_offload: no room for the Adam moments ({nbytes / 2**20:.0f} MB) in {d}; free "
                    f"space there or set method.offload_dir to another disk"
                ) from None
            raise UserError(
                f"adam_offload: cannot make a temporary file in {d} ({e.strerror}); set "
                f"method.offload_dir to a writable directory"
            ) from None
        fs = _filesystem(d)
        self.where = f"a temporary file in {d}" + (f" ({fs})" if fs else "")
        if fs in RAM_FS:
            log.warning(
                "adam_offload: %s is on a %s (RAM): the Adam moments stay in memory; set "
                "method.offload_dir to a directory on a disk",
                d,
                fs,
            )

    def _views(self, i: int) -> tuple[Tensor, Tensor]:
        n = self.sizes[i]
        return self.staging[:n], self.staging[n : 2 * n]

    def load(self, i: int, opt: torch.optim.Optimizer) -> None:
        t0 = time.perf_counter()
        n, buf = self.sizes[i], self.staging[: 2 * self.sizes[i]]
        if not self.stepped[i]:
            buf.zero_()  # Adam's initial moments (torch.zeros_like)
        elif self.host is not None:
            buf.copy_(self.host[self.offsets[i] : self.offsets[i] + 2 * n], non_blocking=True)
        else:
            _full(_pread, self.fd, memoryview(buf.numpy()).cast("B"), self.offsets[i] * 4, "reading")
        m, v = self._views(i)
        pos = 0
        for p in self.groups[i]:
            state = opt.state[p]
            if "step" not in state:  # as torch's Adam makes it for fused / capturable
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            k = p.numel()
            state["exp_avg"] = m[pos : pos + k].view_as(p)
            state["exp_avg_sq"] = v[pos : pos + k].view_as(p)
            pos += k
        self.seconds += time.perf_counter() - t0

    def store(self, i: int, opt: torch.optim.Optimizer) -> None:
        t0 = time.perf_counter()
        n, buf = self.sizes[i], self.staging[: 2 * self.sizes[i]]
        if self.host is not None:
            self.host[self.offsets[i] : self.offsets[i] + 2 * n].copy_(buf, non_blocking=True)
        else:
            _full(os.pwrite, self.fd, memoryview(buf.numpy()).cast("B"), self.offsets[i] * 4, "writing")
        self.stepped[i] = True
        for p in self.groups[i]:  # no view into the staging buffer outlives the step
            state = opt.state[p]
            state.pop("exp_avg", None)
            state.pop("exp_avg_sq", None)
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.fd, self.host = None, None, None

    def __enter__(self) -> OffloadedMoments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
