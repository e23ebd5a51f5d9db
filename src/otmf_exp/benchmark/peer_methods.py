"""The methods ``bench-peer`` times on both sides: our runner's configuration beside FusionBench 0.2.33's class.

Each row names our method (protocol and overrides, as ``python -m otmf_exp.run`` takes them) and the
FusionBench algorithm class with the keyword arguments that make it compute the same merge (same λ,
same TIES density, same OPCM α), so that the two timed runs do equal work; the bench checks it by the
max |Δw| between the two merged models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PeerRow:
    """One row of the peer table: ours (runner ``method``/``protocol``/``overrides``) and theirs."""

    method: str
    protocol: str
    overrides: dict[str, Any]
    fb_class: str
    fb_kwargs: dict[str, Any] = field(default_factory=dict)


FB = "fusion_bench.method"
#: name in the table -> the two configurations (data-free methods; ours through the real runner)
PEER: dict[str, PeerRow] = {
    "averaging": PeerRow("averaging", "joint", {}, f"{FB}.simple_average.SimpleAverageAlgorithm"),
    "task_arithmetic": PeerRow(
        "task_arithmetic",
        "joint",
        {"scaling": 0.3},
        f"{FB}.task_arithmetic.task_arithmetic.TaskArithmeticAlgorithm",
        {"scaling_factor": 0.3},
    ),
    # TIES as FusionBench runs it: global top-20 % per task vector, elected sign, summed, λ = 0.3
    "ties": PeerRow(
        "ties",
        "joint",
        {"scaling": 0.3, "density": 0.2, "topk_scope": "global", "merge": "sum"},
        f"{FB}.ties_merging.ties_merging.TiesMergingAlgorithm",
        {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"},
    ),
    "magmax": PeerRow(
        "magmax",
        "joint",
        {"scaling": 0.5},
        f"{FB}.magmax.magmax.MagMaxAlgorithm",
        {"scaling_factor": 0.5},
    ),
    "tsvm": PeerRow(
        "tsvm",
        "joint",
        {"alpha": 1.0},
        f"{FB}.task_singular_vector.TSVM.TaskSingularVectorMerging",
        {"alpha": 1.0},
    ),
    "opcm": PeerRow(
        "opcm",
        "continual",
        {"alpha": 0.5},
        f"{FB}.opcm.opcm.OPCMForCLIP",
        {"alpha": 0.5, "shuffle_order": False, "save_on_every_step": False, "evaluate_on_every_step": False},
    ),
}
#: methods both packages have that the peer table does not time yet (they need FusionBench's
#: CLIP task pool and data loaders on the synthetic tasks; see BENCHMARKS.md "Peer")
NOT_YET = (
    "consensus",
    "dop",
    "fisher",
    "regmean",
    "adamerging (task)",
    "adamerging (layer)",
    "adamerging++",
    "concrete",
    "wemoe",
    "continual_finetune",
)
