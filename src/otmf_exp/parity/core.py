"""Parity rows (a minimal stand-in for the core helper's module: ``Case`` and a direct runner).

A ``Case`` pairs our side (run in this venv) with the reference's (``theirs``, a function named
``module:function`` run in the FusionBench venv); both map (zoo_dir, work_dir) to named tensors and
the row's diff is the max |Δ| over the union of their keys.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    settings: str
    reference: str
    compared: str
    bound: float
    why: str
    ours: Callable[[Path, Path], dict[str, Tensor]]
    theirs: str
    dtype: str = "float32"


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Max |Δ| over the union of keys (a key on one side only: inf)."""
    if set(a) != set(b):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def call(spec: str, zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)(zoo_dir, work_dir)


def run_theirs(spec: str, zoo_dir: Path, work_dir: Path, python: str) -> dict[str, Tensor]:
    """``theirs`` in the reference venv (a subprocess of ``python`` with this package's src on the path)."""
    out = work_dir / f"theirs_{spec.split(':')[1]}.safetensors"
    src = str(Path(__file__).resolve().parents[2])
    code = (
        "import sys; from pathlib import Path; from safetensors.torch import save_file; "
        "from otmf_exp.parity.core import call; "
        "t = call(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])); "
        "save_file({k: v.contiguous() for k, v in t.items()}, sys.argv[4])"
    )
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    subprocess.run([python, "-c", code, spec, str(zoo_dir), str(work_dir), str(out)], check=True, env=env)
    return load_file(str(out))


def run_case(case: Case, zoo_dir: Path, work_dir: Path, python: str) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    ours = case.ours(zoo_dir, work_dir)
    theirs = run_theirs(case.theirs, zoo_dir, work_dir, python)
    d = max_abs_diff(ours, theirs)
    per = {k: max_abs_diff({k: ours[k]}, {k: theirs[k]}) for k in set(ours) & set(theirs)}
    worst = sorted(per, key=per.get)[-3:]
    groups = {k.split("/")[0] for k in per}
    for g in sorted(groups):  # max |Δ| per compared quantity
        print(g, max(v for k, v in per.items() if k.split("/")[0] == g), file=sys.stderr)
    only = sorted(set(ours) ^ set(theirs))[:5]
    return {
        "name": case.name,
        "diff": d,
        "bound": case.bound,
        "ok": d <= case.bound,
        "worst": {k: per[k] for k in worst},
        "one_side": only,
    }


if __name__ == "__main__":  # python -m otmf_exp.parity.core MODULE ZOO WORK PYTHON [names]
    m = importlib.import_module(f"otmf_exp.parity.{sys.argv[1]}")
    names = sys.argv[5].split(",") if len(sys.argv) > 5 else None
    for c in m.CASES:
        if names is None or c.name in names:
            print(
                json.dumps(run_case(c, Path(sys.argv[2]), Path(sys.argv[3]) / c.name, sys.argv[4])),
                flush=True,
            )
