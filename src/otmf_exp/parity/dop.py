"""Parity rows of DOP (``method=dop``, continual) against FusionBench's ``ContinualDOPForCLIP``."""

from __future__ import annotations

from dataclasses import replace

from otmf_exp.parity.core import F64_WHY, Case
from otmf_exp.parity.ours import steps_of
from otmf_exp.parity.reference.dop import TASKS

REF = "otmf_exp.parity.reference.dop"
OPTS = {"svd_rank": "below", "fusionbench_compat": True}

DOP = Case(
    name="dop",
    method="dop",
    settings="continual, rot90,flip,invert, 200 Adam steps, svd_rank=below, fusionbench_compat=true",
    reference="fusion_bench.method.dop.dop.ContinualDOPForCLIP",
    compared="merged weights, every step",
    bound=5e-6,
    why="float32 rounding through 200 Adam steps per Linear (measured 5e-7); float64 agrees to 3e-16",
    ours=steps_of("dop", "continual", tasks=TASKS, **OPTS),
    theirs=f"{REF}:dop",
)
CASES: list[Case] = [
    DOP,
    replace(
        DOP,
        name="dop_f64",
        bound=1e-10,
        why=F64_WHY,
        ours=steps_of("dop", "continual", tasks=TASKS, dtype="float64", **OPTS),
        theirs=f"{REF}:dop_f64",
        dtype="float64",
    ),
]
