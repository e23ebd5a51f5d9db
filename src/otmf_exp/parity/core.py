"""The parity contract (:class:`Case`) and the one diff / report every row goes through.

A row runs ``ours(zoo_dir, work_dir)`` in this venv and ``theirs`` (``"module:function"`` with the
same signature) in the FusionBench venv; both return named tensors and the row's value is
max |Δ| over the union of their keys. A key on one side only, a shape mismatch or a non-finite
value fails the row with a message instead of a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

#: the columns of the printed table, in order (``Row`` attribute names)
COLUMNS = ("method", "settings", "reference", "compared", "max_abs_diff", "bound", "ok")
#: the ``why`` of a float64 row
F64_WHY = "float64 on both sides: agreement to rounding of float64 shows the same semantics"


@dataclass(frozen=True)
class Case:
    """One parity row: our method and the reference computing the same named tensors."""

    name: str  # row id, unique, e.g. "ties", "dop_compat_f64"
    method: str  # our config name, e.g. "ties"
    settings: str  # human-readable, e.g. "joint, scaling=0.3, global top-k 20 %"
    reference: str  # the reference class/function, e.g. "fusion_bench.method.TiesMergingAlgorithm"
    compared: str  # "merged weights" | "coefficients" | "masks" | "logits" | ...
    bound: float  # max |Δ| allowed
    why: str  # why this bound, one sentence (float64 rows show the semantics, <= 1e-10)
    ours: Callable[[Path, Path], dict[str, torch.Tensor]]  # (zoo_dir, work_dir) -> named tensors, our venv
    theirs: str  # "otmf_exp.parity.reference.<module>:<function>", run in the FusionBench venv
    dtype: str = "float32"


@dataclass(frozen=True)
class Diff:
    """The outcome of comparing two named-tensor dicts: the max |Δ|, the worst key, or why not."""

    max_abs_diff: float | None  # None when the comparison could not be made (see ``message``)
    worst_key: str | None
    message: str | None  # set when the sides are not comparable (keys, shapes, non-finite values)


def diff(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> Diff:
    """max |ours − theirs| over the union of keys, in float64; failures as a message."""
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if only_ours or only_theirs:
        parts = [f"only ours: {_few(only_ours)}"] * bool(only_ours)
        parts += [f"only the reference: {_few(only_theirs)}"] * bool(only_theirs)
        return Diff(None, None, "keys differ (" + "; ".join(parts) + ")")
    if not ours:
        return Diff(None, None, "no tensors to compare")
    worst, worst_key = -1.0, None
    for key in sorted(ours):
        a, b = ours[key], theirs[key]
        if tuple(a.shape) != tuple(b.shape):
            return Diff(None, key, f"shape of {key}: ours {tuple(a.shape)}, reference {tuple(b.shape)}")
        for side, t in (("ours", a), ("reference", b)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return Diff(None, key, f"non-finite value in {key} ({side})")
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if d > worst:
            worst, worst_key = d, key
    return Diff(worst, worst_key, None)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass(frozen=True)
class Row:
    """A finished row: the case's description, its measured diff and verdict."""

    name: str
    method: str
    settings: str
    reference: str
    compared: str
    dtype: str
    bound: float
    why: str
    max_abs_diff: float | None
    worst_key: str | None
    ok: bool
    message: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def judge(case: Case, result: Diff | None, error: str | None = None) -> Row:
    """The row of ``case``: ok iff the comparison was made and max |Δ| <= bound."""
    message = error or (result.message if result else "no result")
    value = None if error or result is None else result.max_abs_diff
    ok = message is None and value is not None and math.isfinite(value) and value <= case.bound
    if message is None and not ok:
        message = f"max |Δ| {value:.3g} > bound {case.bound:.3g}"
    return Row(
        name=case.name,
        method=case.method,
        settings=case.settings,
        reference=case.reference,
        compared=case.compared,
        dtype=case.dtype,
        bound=case.bound,
        why=case.why,
        max_abs_diff=value,
        worst_key=None if result is None else result.worst_key,
        ok=ok,
        message=message,
    )


def fmt(value: float | None) -> str:
    """A max |Δ| or bound as printed: ``0``, ``1.2e-07``, or ``—`` when there is none."""
    if value is None:
        return "—"
    return "0" if value == 0 else f"{value:.2g}" if value >= 1e-2 else f"{value:.1e}"


def _cells(row: Mapping) -> list[str]:
    return [
        str(row["method"]),
        str(row["settings"]) + ("" if row.get("dtype", "float32") == "float32" else f" [{row['dtype']}]"),
        str(row["reference"]),
        str(row["compared"]),
        fmt(row["max_abs_diff"]),
        fmt(row["bound"]),
        "ok" if row["ok"] else "FAIL",
    ]


HEADER = ["method", "settings", "reference", "compared", "max |Δ|", "bound", "ok"]


def table(rows: list[Mapping]) -> str:
    """The plain-text table the driver prints (one line per row; failures' messages below it)."""
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if not r["ok"]:
            lines.append(f"FAIL {r['name']}: {r['message']}")
    return "\n".join(lines)


def markdown(rows: list[Mapping]) -> str:
    """The rows as a Markdown table (what the docs show, generated from ``parity.json``)."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        c = _cells(r)
        c[2] = f"`{c[2]}`"
        out.append("| " + " | ".join(esc(x) for x in c) + " |")
    return "\n".join(out)


def perturbation(spec: str | None) -> tuple[str, float] | None:
    """``OTMF_PARITY_PERTURB=<case>:<factor>`` parsed (a test-only hook of the driver), or None."""
    if not spec:
        return None
    name, sep, factor = spec.rpartition(":")
    try:
        value = float(factor)
    except ValueError:
        value = math.nan
    if not sep or not name or not math.isfinite(value):
        raise ValueError(f"OTMF_PARITY_PERTURB={spec!r}: expected <case>:<factor>, e.g. ties:1.0001")
    return name, value


def perturb(tensors: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """``tensors`` with its first floating-point tensor (by name) scaled by ``factor``."""
    key = next((k for k in sorted(tensors) if tensors[k].is_floating_point()), None)
    if key is None:
        raise ValueError("nothing to perturb: no floating-point tensor")
    return {**tensors, key: tensors[key] * factor}
