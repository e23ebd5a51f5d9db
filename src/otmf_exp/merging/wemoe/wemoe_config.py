"""WEMoE's options (Tang et al., ICML 2024; continual LoRA-WEMoE of MINGLE, arXiv 2505.11883): the
``method.*`` schema, its checks, and the nulls resolved per protocol and backbone to the references'
values (FusionBench 0.2.33 ``method/wemoe/weight_ensembling_moe.yaml`` and
``flan_t5_weight_ensembling_moe.yaml`` for joint; zihuanqiu/MINGLE ``config/method/mingle/c_wemoe.yaml``,
``c_wemoe_nlp.yaml`` and their ``c_wemoe*.py`` for continual)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from otmf_exp.errors import UserError
from otmf_exp.schema import SPLITS, choice, num

_BOTH = dict(
    moe_module={"vision": "mlp", "text": "DenseReluDense"}, attn={"vision": "attn.", "text": "Attention."}
)
#: (protocol, modality) -> the reference's value of every null option
AUTO: dict[tuple[str, str], dict[str, Any]] = {
    ("joint", "vision"): dict(experts="full", router_hidden_layers=2, rest="all", lora_rank=16, lora_rank_first=16,
                              lr=1e-4, batch_size=16, max_steps=1000, eval_batch_reduce=False, seed_samples=0,
                              entropy_batch_mean=False),
    ("joint", "text"): dict(experts="full", router_hidden_layers=2, rest="all", lora_rank=32, lora_rank_first=32,
                            lr=1e-4, batch_size=4, max_steps=200, eval_batch_reduce=False, seed_samples=0,
                            entropy_batch_mean=False),
    ("continual", "vision"): dict(experts="lora", router_hidden_layers=1, rest="attn", lora_rank=16,
                                  lora_rank_first=64, lr=1e-4, batch_size=16, max_steps=50,
                                  eval_batch_reduce=True, seed_samples=5, entropy_batch_mean=False),
    ("continual", "text"): dict(experts="lora", router_hidden_layers=1, rest="attn", lora_rank=32,
                                lora_rank_first=32, lr=1e-3, batch_size=8, max_steps=100,
                                eval_batch_reduce=True, seed_samples=100, entropy_batch_mean=True),
}  # fmt: skip


@dataclass
class WEMoEConfig:
    name: str = "wemoe"
    #: experts of the routed blocks: full (task vectors, FusionBench WEMoE) | lora (rank-r SVD of each
    #: Linear weight delta, biases dropped: MINGLE's C. LoRA-WEMoE); null = full (joint) | lora (continual)
    experts: str | None = choice(None, ("full", "lora"))
    #: router depth 0 | 1 | 2; null = 2 (joint, FusionBench) | 1 (continual, c_wemoe.yaml)
    router_hidden_layers: int | None = choice(None, (0, 1, 2))
    #: bias of every new router output (depth 0: its weight); the top-level alpha sets it
    init_lambda: float = num(0.3, unbounded=True)  # a router bias: any real
    #: task-arithmetic coefficient of the parameters outside the routed blocks; null = init_lambda (both refs)
    scaling: float | None = num(None, ge=0)
    #: which parameters outside the routed blocks are task-arithmetic merged (the others stay θ₀):
    #: all (FusionBench) | attn (attention only, the MINGLE authors' continual code) | none;
    #: null = all (joint) | attn (continual)
    rest: str | None = choice(None, ("all", "attn", "none"))
    #: expert rank of the lora experts; the first task's (continual): the authors' CLIP code uses 64 for
    #: the first expert and 16 after; null = 16 / 64 (CLIP) | 32 / 32 (T5); joint: both = lora_rank
    lora_rank: int | None = num(None, ge=1)
    lora_rank_first: int | None = num(None, ge=1)
    #: Adam lr, batch and steps of the test-time adaptation; null = joint 1e-4, 16 (T5: 4), 1000 (T5: 200);
    #: continual 1e-4, 16, 50 (T5: 1e-3, 8, 100)
    lr: float | None = num(None, gt=0)
    batch_size: int | None = num(None, ge=1)
    max_steps: int | None = num(None, ge=0)
    #: routing averaged over the batch during adaptation (both references: true)
    batch_reduce: bool = True
    #: ... and during evaluation; null = false (joint: FusionBench routes per sample after adaptation) |
    #: true (continual: the MINGLE authors' code keeps the batch routing)
    eval_batch_reduce: bool | None = None
    #: split of the unlabeled adaptation data (both references: test)
    adapt_split: str = choice("test", SPLITS)
    #: samples of the task adapted on; null = joint 0 (the whole split) | continual 5 per class
    #: (CLIP; the authors' select_seed_subset) | 100 in total (T5)
    seed_samples: int | None = num(None, ge=0)
    #: continual: the rebuilt router keeps every row trainable (the authors' code: old rows are copied into
    #: a fresh trainable Linear) | false: only the new row
    train_old_rows: bool = True
    #: entropy of the batch-mean logits (the T5 continual code) instead of the mean per-sample entropy;
    #: null = false (CLIP, joint) | true (continual T5)
    entropy_batch_mean: bool | None = None
    #: the last name component of the blocks upscaled to MoE; null = mlp (CLIP) | DenseReluDense (T5)
    moe_module: str | None = None


@dataclass
class Options:
    """The config with every null resolved for the protocol and the backbone (recorded at step 1)."""

    experts: str
    router_hidden_layers: int
    rest: str
    lora_rank: int
    lora_rank_first: int
    lr: float
    batch_size: int
    max_steps: int
    eval_batch_reduce: bool
    seed_samples: int
    entropy_batch_mean: bool
    moe_module: str
    attn: str
    init_lambda: float
    scaling: float
    batch_reduce: bool
    adapt_split: str
    train_old_rows: bool


def validate_config(cfg: Any) -> None:
    """One-line :class:`UserError` for a rule no declaration of WEMoEConfig states."""
    if cfg.moe_module is not None and not str(cfg.moe_module):
        raise UserError("method.moe_module must name a module, e.g. mlp")


def resolve_options(cfg: Any, protocol: str, modality: str) -> Options:
    """``cfg`` with every null replaced by the reference's value for ``protocol`` and the backbone."""
    mod = "text" if modality == "text" else "vision"
    auto = {**AUTO[(protocol, mod)], **{k: v[mod] for k, v in _BOTH.items()}}
    vals = {k: (v if k not in cfg or cfg[k] is None else cfg[k]) for k, v in auto.items()}
    if protocol == "joint" and cfg.lora_rank_first is None:
        vals["lora_rank_first"] = vals["lora_rank"]
    rest = {f.name: cfg[f.name] for f in fields(Options) if f.name not in vals and f.name != "scaling"}
    scaling = cfg.init_lambda if cfg.scaling is None else cfg.scaling
    return Options(**vals, **rest, scaling=float(scaling))
