"""Parity rows of OPCM (``method=opcm``, continual) against FusionBench's ``OPCMForCLIP``."""

from __future__ import annotations

from dataclasses import replace

from otmf_exp.parity.core import F64_WHY, Case
from otmf_exp.parity.ours import steps_of

REF = "otmf_exp.parity.reference.opcm"

OPCM = Case(
    name="opcm",
    method="opcm",
    settings="continual, 8 tasks, alpha=0.5, fusionbench_compat=true",
    reference="fusion_bench.method.opcm.opcm.OPCMForCLIP",
    compared="merged weights, every step",
    bound=5e-5,
    why="float32 SVD rounding (ours: float32, float64 near an ambiguous split rank) grown over 8 steps; "
    "float64 with svd_dtype=float64 agrees to 2e-14",
    ours=steps_of("opcm", "continual", fusionbench_compat=True),
    theirs=f"{REF}:opcm",
)
CASES: list[Case] = [
    OPCM,
    replace(
        OPCM,
        name="opcm_f64",
        settings=OPCM.settings + ", svd_dtype=float64",
        bound=1e-10,
        why=F64_WHY,
        ours=steps_of("opcm", "continual", dtype="float64", fusionbench_compat=True, svd_dtype="float64"),
        theirs=f"{REF}:opcm_f64",
        dtype="float64",
    ),
]
