"""The one progress display of the project: a tqdm bar on a terminal, plain log lines elsewhere.

    for it in progress(range(steps), desc="AdaMerging", enabled=ctx.progress):
        ...

When stderr is a terminal this is ``tqdm`` (``\\r`` frames redrawing one bar). When it is not (a
SLURM ``.out``, a ``tee``'d log, a CI job) a bar would fill the log with ``\\r`` frames, so instead
one plain line goes through ``logging`` (logger ``otmf_exp.progress``, level INFO) each time the
loop crosses another ``every`` percent (default 10 %: at most 10 lines per loop, the last one at
100 %). ``enabled=False`` (``progress=false``) prints nothing in either mode.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

log = logging.getLogger("otmf_exp.progress")

#: the default step of the log lines, in percent of the total
EVERY = 10


def is_tty(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream is not a terminal
        return False


class LogProgress:
    """The non-terminal mode: one ``desc: 30% (3/10) 2.1s key=value`` line per ``every`` percent."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str, every: float) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc = iterable, total, desc
        self.every = float(every)
        self.n, self.postfix, self._next = 0, "", self.every
        self._t0 = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "progress(): nothing to iterate"
        for x in self.iterable:
            yield x
            self.update(1)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:  # unknown length: no percentages to cross
            return
        pct = 100.0 * self.n / self.total
        if pct + 1e-9 >= self._next:
            while self._next <= pct + 1e-9:
                self._next += self.every
            self._line(pct)

    def set_postfix(self, **kv: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kv.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass

    def _line(self, pct: float) -> None:
        dt = time.perf_counter() - self._t0
        tail = f" {self.postfix}" if self.postfix else ""
        log.info("%s: %3.0f%% (%d/%d) %.1fs%s", self.desc, pct, self.n, self.total, dt, tail)


class _Off:
    """``enabled=False``: the same interface, silent."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable or ())

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kv: Any) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    every: float = EVERY,
    stream: TextIO | None = None,
    leave: bool = False,
) -> Any:
    """A bar over ``iterable`` (or a manual one: ``total=`` then ``.update(n)``): tqdm on a
    terminal ``stream`` (default stderr), log lines every ``every`` % otherwise, nothing when
    ``enabled`` is false. Supports iteration, ``update``, ``set_postfix``, ``set_description``,
    ``close`` and ``with``."""
    if not enabled:
        return _Off(iterable)
    if not 0 < every <= 100:
        raise ValueError(f"progress(every={every}): a percentage in (0, 100]")
    stream = sys.stderr if stream is None else stream
    if is_tty(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=leave, file=stream)
    return LogProgress(iterable, total, desc, every)
