"""Parity rows of the data-free task-vector family (averaging, TA, TIES, MagMax, TSV-M, Consensus TA)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from otmf_exp.parity.core import F64_WHY as F64
from otmf_exp.parity.core import Case
from otmf_exp.parity.ours import run

REF = "otmf_exp.parity.reference.task_arithmetic"
FB = "fusion_bench.method."
POS = "vision_model.embeddings.position_embedding.weight"


def _joint(
    name: str, zoo_dir: Path, work_dir: Path, dtype: str = "float32", **opts
) -> dict[str, torch.Tensor]:
    return run(zoo_dir, name, "joint", dtype=dtype, **opts)[0]


def _case(name: str, method: str, settings: str, reference: str, bound: float, why: str, **kw) -> Case:
    dtype = kw.pop("dtype", "float32")
    return Case(
        name=name,
        method=method,
        settings=settings,
        reference=reference,
        compared="merged weights",
        bound=bound,
        why=why,
        ours=partial(_joint, method, dtype=dtype, **kw),
        theirs=f"{REF}:{name}",
        dtype=dtype,
    )


SAME_OPS = "the same float operations in the same order: bit-identical"
SUM_ORDER = (
    "float32 rounding of the task vectors summed in another order (a few ulp of |θ|); the float64 row agrees"
)
CASES: list[Case] = [
    _case("averaging", "averaging", "joint, 8 tasks", FB + "SimpleAverageAlgorithm", 5e-7, SUM_ORDER),
    _case(
        "averaging_f64",
        "averaging",
        "joint, 8 tasks",
        FB + "SimpleAverageAlgorithm",
        1e-10,
        F64,
        dtype="float64",
    ),
    _case(
        "task_arithmetic",
        "task_arithmetic",
        "joint, scaling=0.3",
        FB + "TaskArithmeticAlgorithm",
        5e-7,
        SUM_ORDER,
    ),
    _case(
        "task_arithmetic_f64",
        "task_arithmetic",
        "joint, scaling=0.3",
        FB + "TaskArithmeticAlgorithm",
        1e-10,
        F64,
        dtype="float64",
    ),
    _case(
        "ties",
        "ties",
        "joint, scaling=0.3, global top-k 20 %, sum",
        FB + "TiesMergingAlgorithm",
        0.0,
        SAME_OPS,
    ),
    _case(
        "ties_f64",
        "ties",
        "joint, scaling=0.3, global top-k 20 %, sum",
        FB + "TiesMergingAlgorithm",
        1e-10,
        F64,
        dtype="float64",
    ),
    _case("magmax", "magmax", "joint, scaling=0.5", FB + "magmax.MagMaxAlgorithm", 0.0, SAME_OPS),
    _case("tsvm", "tsvm", "joint, alpha=1", FB + "TaskSingularVectorMerging", 0.0, SAME_OPS),
    _case(
        "tsvm_alpha05_exclude_pos",
        "tsvm",
        "joint, alpha=0.5, position embedding excluded",
        FB + "TaskSingularVectorMerging",
        0.0,
        SAME_OPS,
        alpha=0.5,
        exclude_keys=[POS],
    ),
    _case(
        "consensus",
        "consensus",
        "joint, λ=0.3, λ_t=0.6, k=2",
        FB + "tall_mask.utils (generate_task_masks, construct_consensus_mask)",
        0.0,
        SAME_OPS,
    ),
    _case(
        "consensus_bug",
        "consensus",
        "joint, fusionbench_mask_bug=true",
        FB + "tall_mask.task_arithmetic.generate_task_masks",
        0.0,
        SAME_OPS,
        fusionbench_mask_bug=True,
    ),
]
