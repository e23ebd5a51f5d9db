"""Parity rows of OPCM (``method=opcm``, continual) against FusionBench's ``OPCMForCLIP``."""

from __future__ import annotations

from otmf_exp.parity.core import Case
from otmf_exp.parity.ours import steps_of

REF = "otmf_exp.parity.reference.opcm"
SETTINGS = "continual, 8 tasks, alpha=0.5, fusionbench_compat=true"
COMPARED = "merged weights, every step"

CASES: list[Case] = [
    Case(
        name="opcm",
        method="opcm",
        settings=SETTINGS,
        reference="fusion_bench.method.opcm.opcm.OPCMForCLIP",
        compared=COMPARED,
        bound=5e-5,
        why="float32 SVD rounding (ours: float32, float64 near an ambiguous split rank) grown over 8 steps; float64 with svd_dtype=float64 agrees to 2e-14",
        ours=steps_of("opcm", "continual", fusionbench_compat=True),
        theirs=f"{REF}:opcm",
    ),
    Case(
        name="opcm_f64",
        method="opcm",
        settings=SETTINGS,
        reference="fusion_bench.method.opcm.opcm.OPCMForCLIP",
        compared=COMPARED,
        bound=1e-10,
        why="float64 weights and SVDs on both sides: the same semantics",
        ours=steps_of("opcm", "continual", dtype="float64", fusionbench_compat=True, svd_dtype="float64"),
        theirs=f"{REF}:opcm_f64",
        dtype="float64",
    ),
]
