"""Wall time and peak memory of a block: CUDA max allocated on GPU, peak RSS (sampled) on CPU."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil
import torch


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    #: memory in use when the block began (the peak above it is what the block itself needed)
    start_memory_mb: float = 0.0
    memory_kind: str = "cpu_rss"


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: CUDA allocated on GPU, the process RSS on CPU (MB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


class measure:  # noqa: N801 - used as a context manager
    """``with measure(device) as u: ...`` fills ``u.wall_s``, ``u.peak_memory_mb`` and ``u.start_memory_mb``."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval_s
        self.usage = Usage(memory_kind="cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss")
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak = max(self._peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Usage:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.usage.start_memory_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._peak = psutil.Process().memory_info().rss
            self.usage.start_memory_mb = self._peak / 2**20
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self.usage

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.usage.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, psutil.Process().memory_info().rss)
            self.usage.peak_memory_mb = self._peak / 2**20
        self.usage.wall_s = time.perf_counter() - self._t0
