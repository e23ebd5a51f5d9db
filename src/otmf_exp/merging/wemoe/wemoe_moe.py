"""Weight-Ensembling MoE layers (Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture
of Experts", ICML 2024): routers, routed task-vector experts and their forward hooks; pure maths.

A *MoE module* is a feed-forward block of the backbone (HF CLIP ``…mlp``, open_clip ``…mlp``, T5
``…DenseReluDense``) whose linear *sites* (``lora_moe.Site``) get routed experts. Its router maps
the block's input tokens to T weights, ``r = token-mean(router(x))`` (per sample; averaged over the
batch too with ``batch_reduce``), and the block runs with weights θ₀ + Σ_i r_i·τ_i (FusionBench's
``WeightEnsemblingMoE``). Linear in the weights, so each site computes
``x·W₀ᵀ + b₀ + Σ_i r_i·(x·τ_iᵀ + τb_i)`` — with full task vectors τ_i (``tv_w [T, O, C]``, ``tv_b
[T, O]``) or low-rank experts τ_i = B_i A_i (``A [Σr, C]``, ``B [O, Σr]``, ranks per expert).

Routers (``router_hidden_layers``): 0 = one learned weight per expert (``w [T]``); 1 = Linear H→T
(``w [T, H]``, ``b [T]``); 2 = Linear H→H, ReLU, Linear H→T (``w1``, ``b1`` then ``w``, ``b``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otmf_exp.merging.adaptation import entropy
from otmf_exp.merging.lora_moe import Site


def entropy_loss(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """FusionBench's ``entropy_loss``: −Σ p·log(p + eps) over the last dim, mean over the rest (float32,
    float64 for float64 logits: :func:`otmf_exp.merging.adaptation.entropy`)."""
    return entropy(logits, eps)


# ---- routers ---------------------------------------------------------------------------------------
def init_router(
    depth: int, hidden: int, n: int, init_lambda: float, gen: torch.Generator, dtype: torch.dtype
) -> dict[str, Tensor]:
    """A router for ``n`` experts as FusionBench's ``construct_weight_ensembling_gate`` initialises it:
    depth 0 constant ``init_lambda``; the last Linear N(0, 0.01²) with bias ``init_lambda``; the hidden
    Linear of depth 2 N(0, 0.01²) with bias 0."""
    if depth == 0:
        return {"w": torch.full((n,), init_lambda, dtype=dtype)}
    out = {}
    if depth == 2:
        out["w1"] = 0.01 * torch.randn(hidden, hidden, generator=gen, dtype=dtype)
        out["b1"] = torch.zeros(hidden, dtype=dtype)
    out["w"] = 0.01 * torch.randn(n, hidden, generator=gen, dtype=dtype)
    out["b"] = torch.full((n,), init_lambda, dtype=dtype)
    return out


def grow_router(router: dict[str, Tensor], init_lambda: float, gen: torch.Generator) -> dict[str, Tensor]:
    """One more expert (the MINGLE authors' ``append_expert_and_rebuild_gate``): the last layer gets a
    row N(0, 0.01²) with bias ``init_lambda`` (depth 0: one weight ``init_lambda``); the rest is kept."""
    w = router["w"]
    if w.dim() == 1:
        return {"w": torch.cat([w, w.new_full((1,), init_lambda)])}
    row = 0.01 * torch.randn(1, w.shape[1], generator=gen, dtype=w.dtype)
    out = dict(router)
    out["w"] = torch.cat([w, row.to(w.device)])
    out["b"] = torch.cat([router["b"], router["b"].new_full((1,), init_lambda)])
    return out


def route(router: Mapping[str, Tensor], x: Tensor, batch_reduce: bool) -> Tensor:
    """Routing weights ``[B, T]`` (``[1, T]`` with ``batch_reduce`` or a depth-0 router) for a block input
    ``x`` ``[B, L, H]`` (batch first): the router runs on every token, then the token mean is taken."""
    w = router["w"]
    if w.dim() == 1:
        return w[None].to(x.dtype)
    h = x
    if "w1" in router:
        h = F.relu(F.linear(h, router["w1"].to(x.dtype), router["b1"].to(x.dtype)))
    g = F.linear(h, w.to(x.dtype), router["b"].to(x.dtype))
    if g.dim() > 2:
        g = g.mean(dim=tuple(range(1, g.dim() - 1)))
    return g.mean(0, keepdim=True) if batch_reduce else g


# ---- experts -------------------------------------------------------------------------------------------
@dataclass
class Experts:
    """One site's experts: full task vectors (``tv_w`` ``[T, O, C]``, ``tv_b`` ``[T, O]`` or None), or
    low-rank ones (``a`` ``[Σr, C]``, ``b`` ``[O, Σr]``, ``ranks`` the r of each expert)."""

    tv_w: Tensor | None = None
    tv_b: Tensor | None = None
    a: Tensor | None = None
    b: Tensor | None = None
    ranks: list[int] = field(default_factory=list)

    def delta(self, x: Tensor, r: Tensor) -> Tensor:
        """Σ_i r_i·(x·τ_iᵀ + τb_i) for ``x`` ``[B, ..., C]`` and routing ``r`` ``[B or 1, T]``."""
        view = (r.shape[0], *([1] * (x.dim() - 2)), -1)
        if self.a is not None:
            scale = r.repeat_interleave(torch.as_tensor(self.ranks, device=r.device), dim=1)
            return (F.linear(x, self.a.to(x.dtype)) * scale.view(view)) @ self.b.T.to(x.dtype)
        tv_w, tv_b = self.tv_w.to(x.dtype), None if self.tv_b is None else self.tv_b.to(x.dtype)
        if r.shape[0] == 1:  # one routing for the batch: one merged delta, one matmul
            d_b = None if tv_b is None else r[0] @ tv_b
            return F.linear(x, torch.einsum("t,toc->oc", r[0], tv_w), d_b)
        out = 0
        for i in range(tv_w.shape[0]):
            out = out + r[:, i].view(view[:-1] + (1,)) * F.linear(
                x, tv_w[i], None if tv_b is None else tv_b[i]
            )
        return out


@dataclass(frozen=True)
class MoEBlock:
    """One upscaled feed-forward block: its module name and the sites inside it."""

    name: str
    hidden: int
    sites: tuple[Site, ...]


@contextmanager
def attached(
    module: nn.Module,
    blocks: Sequence[MoEBlock],
    routers: Mapping[str, Mapping[str, Tensor]],
    experts: Mapping[str, Experts],
    batch_reduce: bool,
) -> Iterator[None]:
    """Within the block, every forward of ``module`` (plain, ``functional_call``, ``generate``) routes:
    a forward pre-hook on each MoE block computes its routing from the block's input, forward hooks
    on its sites add the routed experts."""
    mods = dict(module.named_modules())
    handles = []
    try:
        for blk in blocks:
            state: dict[str, Tensor] = {}

            def pre(mod: nn.Module, args: tuple, blk: MoEBlock = blk, state: dict = state) -> None:
                state["r"] = route(routers[blk.name], args[0], batch_reduce)

            handles.append(mods[blk.name].register_forward_pre_hook(pre))
            for site in blk.sites:

                def hook(
                    mod: nn.Module, args: tuple, out: Tensor, e: Experts = experts[site.name], state=state
                ):
                    return out + e.delta(args[0], state["r"])

                handles.append(mods[site.module].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
