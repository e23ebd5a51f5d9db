"""The methods ``bench-peer`` times on both sides: our runner's configuration beside FusionBench 0.2.33's class.

Each row names our method (protocol and overrides, as ``python -m otmf_exp.run`` takes them) and the
FusionBench algorithm class with the keyword arguments that make it compute the same merge (same λ,
same TIES density, same OPCM α), so that the two timed runs do equal work; the bench checks it by the
max |Δw| between the two merged models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from otmf_exp.parity.reference.finetune import ZERO_GRAD  # the continual_finetune parity row's


@dataclass(frozen=True)
class PeerRow:
    """One row of the peer table: ours (runner ``method``/``protocol``/``overrides``) and theirs."""

    method: str
    protocol: str
    overrides: dict[str, Any]
    fb_class: str
    fb_kwargs: dict[str, Any] = field(default_factory=dict)
    #: FusionBench has no class for it: ``module:function`` called with the pool, returning the merged
    #: state dict (FusionBench's own functions inside; ``fb_class`` then names those functions)
    fb_call: str | None = None
    #: data-driven: ours draws batches on the synthetic tasks; the bench saves the same ones for theirs
    data: bool = False
    #: key suffixes the Δw check leaves out, as the method's parity row does (a true gradient of 0:
    #: Adam turns each side's float noise into ±lr steps)
    skip: tuple[str, ...] = ()


FB = "fusion_bench.method"
TASK_WISE = "clip_task_wise_adamerging.CLIPTaskWiseAdaMergingAlgorithm"
LAYER_WISE = "clip_layer_wise_adamerging.CLIPLayerWiseAdaMergingAlgorithm"
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
    # as parity.json's opcm row: fusionbench_compat=true (FusionBench's handling of CLIP's class token);
    # without it the merged weights differ by design (3.2e-3 in an earlier bench-peer run)
    "opcm": PeerRow(
        "opcm",
        "continual",
        {"alpha": 0.5, "fusionbench_compat": True},
        f"{FB}.opcm.opcm.OPCMForCLIP",
        {"alpha": 0.5, "shuffle_order": False, "save_on_every_step": False, "evaluate_on_every_step": False},
    ),
    # DOP as parity.json's dop row runs it: dop.yaml's defaults (MGDA, EMA, 200 Adam steps, uv), the given
    # order, seed 0; ours with FusionBench's rank rule and update order (svd_rank=below, compat)
    "dop": PeerRow(
        "dop",
        "continual",
        {"steps": 200, "svd_rank": "below", "fusionbench_compat": True},
        f"{FB}.dop.dop.ContinualDOPForCLIP",
        {
            "seed": 0,
            "shuffle_order": False,
            "save_on_every_step": False,
            "evaluate_on_every_step": False,
            "lr": 1e-4,
            "num_steps": 200,
            "mgda": True,
            "alpha": 0.8,
            "ema": True,
            "ema_beta": 0.999,
            "svd_epsilon": 0.99999,
            "svd_proj_space": "uv",
        },
    ),
    # Consensus TA (joint, λ=0.3, λ_t=0.6, k=2): FusionBench has its TALL-mask functions, no merging class;
    # parity's reference function drives them on the pool's models
    "consensus": PeerRow(
        "consensus",
        "joint",
        {"scaling": 0.3},
        f"{FB}.tall_mask.utils.construct_consensus_mask",
        fb_call="otmf_exp.benchmark.peer_fb:consensus",
    ),
    # data-driven, joint: defaults (256 examples, batch 32, train split: the synthetic tasks' 64 images,
    # so 2 batches per task on both sides); FusionBench's per-task loops fed our batches (parity's plumbing)
    "fisher": PeerRow(
        "fisher",
        "joint",
        {},
        f"{FB}.fisher_merging.fisher_merging.merging_with_fisher_weights",
        fb_call="otmf_exp.benchmark.peer_fb:fisher",
        data=True,
    ),
    "regmean": PeerRow(
        "regmean",
        "joint",
        {},
        f"{FB}.regmean.regmean.merging_with_regmean_weights",
        fb_call="otmf_exp.benchmark.peer_fb:regmean",
        data=True,
    ),
    # AdaMerging as parity.json's adamerging_* rows run it (joint, 20 Adam steps, batch 16, init 0.3,
    # lr 1e-3, entropy −Σ p log(p + 1e-8)); FusionBench's class fed the batches ours draws (its test
    # streams), parity's plumbing; ++ = TIES-pruned task vectors (K 20 %, global), clamp(λ, 0, 1) in the merge
    **{
        name: PeerRow(
            "adamerging",
            "joint",
            {"steps": 20, "batch_size": 16, "entropy_eps": 1e-8, **opts},
            f"{FB}.adamerging.{cls}",
            fb_call="otmf_exp.benchmark.peer_fb:adamerging",
            data=True,
        )
        for name, opts, cls in (
            ("adamerging_task", {"granularity": "task"}, TASK_WISE),
            ("adamerging_layer", {"granularity": "layer"}, LAYER_WISE),
            ("adamerging_plus", {"granularity": "layer", "tv_prune": "ties", "clamp": "merge"}, LAYER_WISE),
        )
    },
    # Concrete as parity.json's concrete_* rows run it (joint, 20 mask steps, batch 16, task-wise,
    # fusionbench_stale_inner; adamerging: then 20 AdaMerging steps); FusionBench's class fed the
    # batches ours draws and our mask generator's seed (parity's plumbing)
    **{
        name: PeerRow(
            "concrete",
            "joint",
            {
                "merge": merge,
                "granularity": "task",
                "max_steps": 20,
                "batch_size": 16,
                "max_adamerging_steps": 20,
                "fusionbench_stale_inner": True,
            },
            f"{FB}.concrete_subspace.{cls}",
            fb_call="otmf_exp.benchmark.peer_fb:concrete",
            data=True,
        )
        for name, merge, cls in (
            (
                "concrete_ta",
                "task_arithmetic",
                "clip_concrete_task_arithmetic.ConcreteTaskArithmeticAlgorithmForCLIP",
            ),
            (
                "concrete_adamerging",
                "adamerging",
                "clip_concrete_adamerging.ConcreteTaskWiseAdaMergingForCLIP",
            ),
        )
    },
    # continual fine-tuning as parity.json's continual_finetune row runs it (full, 8 Adam steps per task,
    # batch 16, lr 1e-5, cosine); FusionBench's class on θ₀ fed the batches ours draws (parity's plumbing)
    "continual_finetune": PeerRow(
        "continual_finetune",
        "continual",
        {"steps": 8, "batch_size": 16},
        f"{FB}.classification.continual_clip_finetune.ContinualImageClassificationFineTuningForCLIP",
        fb_call="otmf_exp.benchmark.peer_fb:continual_finetune",
        data=True,
        skip=(ZERO_GRAD,),
    ),
}
#: methods both packages have that the peer table does not time yet -> why (BENCHMARKS.md "Peer")
NOT_YET = {
    "wemoe": "the runner's merged.safetensors holds WEMoE's merged weights alone, not its routers and "
    "experts, so the equal-results check would see its task-arithmetic part only",
}
