"""MINGLE's options (arXiv 2505.11883): the ``method.*`` schema, its checks, and the nulls resolved per
backbone to the authors' values (their ``config/method/mingle/mingle.yaml`` for CLIP,
``mingle_nlp.yaml`` + ``mingle_nlp.py`` for Flan-T5)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from otmf_exp.errors import UserError
from otmf_exp.schema import SPLITS, choice, num

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the authors' per-backbone defaults (config/method/mingle/mingle.yaml, mingle_nlp.yaml, mingle_nlp.py)
AUTO = {
    "vision": dict(
        lora_layer=["attn", "mlp"],
        lr=1e-4,
        batch_size=16,
        seed_samples=5,
        seed_sampling="per_class",
        subspace="grow",
        kd_t_squared=False,
        dropout=False,
    ),
    "text": dict(
        lora_layer=["DenseReluDense.wi", "SelfAttention", "EncDecAttention"],
        lr=1e-3,
        batch_size=8,
        seed_samples=100,
        seed_sampling="total",
        subspace="keep_first",
        kd_t_squared=True,
        dropout=True,
    ),
}


@dataclass
class MINGLEConfig:
    name: str = "mingle"
    #: substrings of the layer names that get experts; null = the authors' default for the backbone:
    #: [attn, mlp] (CLIP: q,k,v,out_proj,fc1,fc2) | [DenseReluDense.wi, SelfAttention, EncDecAttention] (T5).
    #: MINGLE*: [q_proj, k_proj, v_proj, fc1]
    lora_layer: list[str] | None = None
    #: expert rank r (capped at min(O, C))
    lora_r: int = num(64, ge=1)
    #: one routing per batch (gates averaged over the batch) | false: per sample
    batch_reduce: bool = True
    #: Adam learning rate and batch of the adaptation; null = 1e-4 / 16 (CLIP) | 1e-3 / 8 (T5)
    lr: float | None = num(None, gt=0)
    batch_size: int | None = num(None, ge=1)
    #: Adam steps per task
    max_steps: int = num(50, ge=0)
    #: seed samples: null = 5 per class (CLIP) | 100 in total (T5)
    seed_samples: int | None = num(None, ge=1)
    #: per_class | total; null = per_class (CLIP) | total (T5)
    seed_sampling: str | None = choice(None, ("per_class", "total"))
    #: split the seed samples come from: test (the authors' code; test leakage, flagged) | validation | train
    seed_split: str = choice("test", SPLITS)
    #: input directions per task added to U; grow (3t columns, CLIP code and paper) | keep_first (T5 code:
    #: U keeps the first task's k directions); null = grow (CLIP) | keep_first (T5)
    subspace_k: int = num(3, ge=0)
    subspace: str | None = choice(None, ("grow", "keep_first"))
    #: soft null-space projection of the new gate row's weight gradient: λ_i = exp(−γ·h_i), h EMA with β
    constraint_gate: bool = True
    gamma: float = num(1.0, ge=0)
    beta: float = num(0.99, ge=0, le=1)
    #: new gate row: weight normal(0, gate_init_std²) (code) | zeros (paper Alg. 1); bias init_lambda
    gate_init: str = choice("normal", ("normal", "zeros"))
    gate_init_std: float = num(0.01, ge=0)
    init_lambda: float = num(0.0, unbounded=True)  # a gate bias: any real
    #: also zero the diagonal of P = uᵀΔv (the code's `P.diag().fill_(0)` is a no-op on a copy)
    zero_diag: bool = False
    #: dtype of the SVDs of the expert construction: float32 (code) | float64
    svd_dtype: str = choice("float32", SVD_DTYPES)
    #: distillation temperature; multiply the loss by T²: null = false (CLIP) | true (T5)
    kd_temperature: float = num(2.0, gt=0)
    kd_t_squared: bool | None = None
    #: student in train mode (dropout) during adaptation; null = false (CLIP) | true (T5)
    dropout: bool | None = None
    #: T5: length of the teacher's greedy answers; decoder input of the covariance pass:
    #: labels (gold answers, code) | teacher (the teacher's answers: no label use)
    max_new_tokens: int = num(32, ge=1)
    cov_decoder: str = choice("labels", ("labels", "teacher"))
    #: the 0-sample "static" variant: every gate fixed at this value (paper: 0.3), no adaptation, no data
    static_gate: float | None = num(None, unbounded=True)  # a gate value: any real


@dataclass
class Options:
    """The config with every null resolved for the backbone's modality (recorded at step 1)."""

    lora_layer: list[str]
    lr: float
    batch_size: int
    seed_samples: int
    seed_sampling: str
    subspace: str
    kd_t_squared: bool
    dropout: bool
    lora_r: int
    batch_reduce: bool
    max_steps: int
    seed_split: str
    subspace_k: int
    constraint_gate: bool
    gamma: float
    beta: float
    gate_init: str
    gate_init_std: float
    init_lambda: float
    zero_diag: bool
    svd_dtype: str
    kd_temperature: float
    max_new_tokens: int
    cov_decoder: str
    static_gate: float | None


def validate_config(cfg: Any) -> None:
    """One-line :class:`UserError` for a rule no declaration of MINGLEConfig states."""
    if cfg.lora_layer is not None and len(cfg.lora_layer) == 0:
        raise UserError("method.lora_layer must name at least one layer")


def resolve_options(cfg: Any, modality: str) -> Options:
    """``cfg`` with every null replaced by the authors' value for a ``vision`` or ``text`` backbone."""
    auto = AUTO["text" if modality == "text" else "vision"]
    vals = {f: (cfg[f] if cfg[f] is not None else auto[f]) for f in auto}
    vals["lora_layer"] = [str(s) for s in vals["lora_layer"]]
    rest = {f.name: cfg[f.name] for f in fields(Options) if f.name not in vals}
    opts = Options(**vals, **rest)
    if opts.seed_sampling == "per_class" and modality == "text":
        raise UserError("method.seed_sampling=per_class needs class labels; text tasks use total")
    return opts
