"""WEMoE: Weight-Ensembling Mixture of Experts (Tang et al., "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", ICML 2024), joint, and its continual LoRA variant
(C. LoRA-WEMoE, the baseline of MINGLE, Qiu et al., arXiv 2505.11883).

Every feed-forward block (``moe_module``) becomes a routed MoE over the task vectors, θ₀ + Σ_i r_i(x)·τ_i,
with a router per block (``wemoe_moe``); the parameters outside the blocks are task-arithmetic merged
(``rest``, coefficient ``scaling``). The routers are then adapted at test time by Adam on the
prediction entropy of unlabeled samples.

Protocols:
  * joint (FusionBench 0.2.33 ``CLIPWeightEnsemblingMoEAlgorithm``): full task vectors of all T tasks,
    depth-2 routers, everything else θ₀ + λ·Στ, 1000 steps of one test batch per task (entropies summed).
  * continual (the MINGLE authors' ``ContinualWEMoE``): step t adds a rank-r SVD expert of each Linear
    weight delta of the blocks (r = 64 for the first task, 16 after), one router row N(0, 0.01²) with
    bias λ, attention += λ·τ_t (everything else θ₀), and adapts every router 50 steps on 5 test samples
    per class of task t.

The carried state grows per task (experts and router rows); see docs/methods/wemoe.md.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

import torch

from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adaptation import sample_seeds, subsample
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.lora_moe import Site, find_sites, low_rank
from otmf_exp.merging.task_vectors import StateDict, check_compatible
from otmf_exp.merging.wemoe.wemoe_config import Options, WEMoEConfig, resolve_options, validate_config
from otmf_exp.merging.wemoe.wemoe_moe import (
    Experts,
    MoEBlock,
    attached,
    entropy_loss,
    grow_router,
    init_router,
    route,
)

log = logging.getLogger(__name__)
ROUTER_KEYS = ("w1", "b1", "w", "b")


class WEMoE(MergeMethod):
    name = "wemoe"
    Config = WEMoEConfig
    protocols = ("continual", "joint")
    main_coef = "init_lambda"
    state_growth = "per_task"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        validate_config(cfg)

    # ---- configuration and structure -------------------------------------------------------------
    def options(self) -> Options:
        return resolve_options(self.cfg, self.protocol, self.ctx.backbone.modality)

    def blocks(self) -> list[MoEBlock]:
        if getattr(self, "_blocks", None) is None:
            bb, suffix = self.ctx.backbone, self.options().moe_module
            mergeable = set(bb.mergeable_names())
            out = []
            for name, mod in bb.module.named_modules():
                if name.rsplit(".", 1)[-1] == suffix:
                    sites = find_sites(
                        mod, {k[len(name) + 1 :] for k in mergeable if k.startswith(f"{name}.")}, [""]
                    )
                    sites = [Site(f"{name}.{s.name}", f"{name}.{s.param}", f"{name}.{s.module}",
                                         s.in_features, s.out_features) for s in sites]  # fmt: skip
                    if sites:
                        out.append(MoEBlock(name, sites[0].in_features, tuple(sites)))
            if not out:
                raise UserError(
                    f"method.moe_module={suffix!r} names no feed-forward block with mergeable Linear layers"
                )
            self._blocks = out
        return self._blocks

    def _keys(self, pretrained: StateDict) -> tuple[list[str], list[str]]:
        """(parameters inside the routed blocks, parameters task-arithmetic merged outside them)."""
        o, prefixes = self.options(), tuple(f"{b.name}." for b in self.blocks())
        inside = [k for k in pretrained if k.startswith(prefixes)]
        outside = [k for k in pretrained if not k.startswith(prefixes)]
        if o.rest == "none":
            outside = []
        elif o.rest == "attn":
            outside = [k for k in outside if o.attn in k]
        return inside, outside

    def _ranks(self, t: int, site: Any) -> int:
        o = self.options()
        return min(o.lora_rank_first if t == 1 else o.lora_rank, site.in_features, site.out_features)

    def _expert_numel(self, site: Any, pretrained: StateDict, t: int) -> int:
        if self.options().experts == "lora":
            return self._ranks(t, site) * (site.in_features + site.out_features)
        bias = site.param[: -len("weight")] + "bias"
        return site.in_features * site.out_features + (site.out_features if bias in pretrained else 0)

    def state_growth_bytes(self, pretrained: StateDict, t: int = 2) -> int:
        """Bytes task t adds (default: any task after the first): its expert at every site and one router
        output (H + 1 numbers; depth 0: 1). The first task adds ``state_growth_bytes(pre, 1)``, which
        differs only when ``lora_rank_first`` ≠ ``lora_rank`` (the authors' CLIP code: 64 vs 16)."""
        depth, total = self.options().router_hidden_layers, 0
        for blk in self.blocks():
            size = pretrained[blk.sites[0].param].element_size()
            total += size * (
                sum(self._expert_numel(s, pretrained, t) for s in blk.sites)
                + (blk.hidden + 1 if depth else 1)
            )
        return total

    # ---- the merged model -----------------------------------------------------------------------------
    def init(self, pretrained: StateDict) -> ContinualState:
        """τᵐ = 0 on the task-arithmetic part; depth-2 routers get their (shared) hidden layer here."""
        _, outside = self._keys(pretrained)
        extra = {}
        if self.options().router_hidden_layers == 2:
            for blk in self.blocks():
                r = self._new_router(blk, pretrained, 0, ("hidden",))
                extra.update({f"{blk.name}/router.{k}": r[k] for k in ("w1", "b1")})
        return ContinualState(
            step=0, merged={k: torch.zeros_like(pretrained[k]) for k in outside}, extra=extra
        )

    def merged(self, state: ContinualState, pretrained: StateDict) -> StateDict:
        out = dict(pretrained)
        out.update({k: pretrained[k] + v for k, v in state.merged.items()})
        return out

    def check_state(self, state: ContinualState, pretrained: StateDict) -> None:
        _, outside = self._keys(pretrained)
        check_compatible(state.merged, {k: pretrained[k] for k in outside}, "checkpoint and model")
        if state.step == 0:
            return
        for blk in self.blocks():
            key = f"{blk.name}/router.w"
            if key not in state.extra or state.extra[key].shape[0] != state.step:
                raise ValueError(
                    f"checkpoint and model differ: router {key!r} missing or not {state.step} experts"
                )
            for s in blk.sites:
                if not any(k.startswith(f"{s.name}/") for k in state.extra):
                    raise ValueError(f"checkpoint and model differ: no expert for {s.name!r}")

    def _routers(self, extra: dict) -> dict[str, dict]:
        return {b.name: {k: extra[f"{b.name}/router.{k}"] for k in ROUTER_KEYS if f"{b.name}/router.{k}" in extra}
                for b in self.blocks()}  # fmt: skip

    def _experts(self, extra: dict, ranks: list[int]) -> dict[str, Experts]:
        out = {}
        for blk in self.blocks():
            for s in blk.sites:
                if f"{s.name}/A" in extra:
                    r = [min(x, s.in_features, s.out_features) for x in ranks]
                    out[s.name] = Experts(a=extra[f"{s.name}/A"], b=extra[f"{s.name}/B"], ranks=r)
                else:
                    out[s.name] = Experts(tv_w=extra[f"{s.name}/tv_w"], tv_b=extra.get(f"{s.name}/tv_b"))
        return out

    def _attached(
        self, extra: dict, ranks: list[int], routers: dict, batch_reduce: bool
    ) -> AbstractContextManager:
        return attached(
            self.ctx.backbone.module, self.blocks(), routers, self._experts(extra, ranks), batch_reduce
        )

    def forward_context(self, state: ContinualState) -> AbstractContextManager[Any]:
        if state.step == 0:
            return nullcontext()
        ranks = state.scalars.get("wemoe_ranks", [])
        return self._attached(
            state.extra, ranks, self._routers(state.extra), self.options().eval_batch_reduce
        )

    # ---- experts and routers ----------------------------------------------------------------------------
    def _add_experts(self, extra: dict, tvs: list[StateDict], t0: int) -> None:
        """Append the experts of task vectors ``tvs`` (tasks t0+1, t0+2, ...) at every site."""
        o = self.options()
        for blk in self.blocks():
            for s in blk.sites:
                if o.experts == "lora":
                    parts = [
                        low_rank(tv[s.param], self._ranks(t0 + 1 + i, s), tv[s.param].dtype)
                        for i, tv in enumerate(tvs)
                    ]
                    a = [extra[f"{s.name}/A"]] if t0 else []
                    b = [extra[f"{s.name}/B"]] if t0 else []
                    extra[f"{s.name}/A"] = torch.cat(a + [p[0] for p in parts]).contiguous()
                    extra[f"{s.name}/B"] = torch.cat(b + [p[1] for p in parts], dim=1).contiguous()
                    continue
                bias = s.param[: -len("weight")] + "bias"
                for key, p in (("tv_w", s.param), ("tv_b", bias)):
                    if p in tvs[0]:
                        old = [extra[f"{s.name}/{key}"]] if t0 else []
                        extra[f"{s.name}/{key}"] = torch.cat(old + [tv[p][None] for tv in tvs]).contiguous()

    def _new_router(self, blk: MoEBlock, pretrained: StateDict, n: int, key: tuple) -> dict:
        o = self.options()
        g = torch.Generator().manual_seed(self.ctx.seed_for("wemoe", *key, blk.name))
        depth = o.router_hidden_layers
        like = pretrained[blk.sites[0].param]
        r = init_router(depth, blk.hidden, max(n, 1), o.init_lambda, g, like.dtype)
        return {k: v.to(like.device) for k, v in r.items()}

    def _grow_routers(self, extra: dict, pretrained: StateDict, t: int) -> None:
        o = self.options()
        for blk in self.blocks():
            cur = self._routers(extra)[blk.name]
            if t == 1:
                new = self._new_router(blk, pretrained, 1, (t,))
                new.update({k: cur[k] for k in ("w1", "b1") if k in cur})
            else:
                g = torch.Generator().manual_seed(self.ctx.seed_for("wemoe", t, blk.name))
                new = grow_router(cur, o.init_lambda, g)
            extra.update({f"{blk.name}/router.{k}": v.contiguous() for k, v in new.items()})

    # ---- test-time adaptation ------------------------------------------------------------------------------
    def _adapt(self, extra: dict, ranks: list[int], pretrained_like: StateDict, streams: list, heads: list,
               what: str, old_rows: int = 0) -> None:  # fmt: skip
        """Adam on every router tensor: each step one batch per stream, entropy summed, one backward per
        stream (FusionBench's ``use_grad_accumulate``). ``old_rows``: rows of the last router layer kept
        fixed (their gradient zeroed: Adam then leaves them exactly as they are)."""
        o, bb = self.options(), self.ctx.backbone
        routers = {
            n: {k: v.clone().requires_grad_(True) for k, v in r.items()}
            for n, r in self._routers(extra).items()
        }
        params = [p for r in routers.values() for p in r.values()]
        self.ctx.record("wemoe_trainable_params", sum(p.numel() for p in params))
        opt = torch.optim.Adam(params, lr=o.lr)
        curve, t0 = [], time.perf_counter()
        with self._attached(extra, ranks, routers, o.batch_reduce):
            for it in range(o.max_steps):
                total = 0.0
                for stream, head in zip(streams, heads):
                    z = bb.logits(pretrained_like, head, bb.to_device(next(stream)))
                    loss = entropy_loss(z.mean(0, keepdim=True) if o.entropy_batch_mean else z)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"WEMoE {what}, iteration {it}: non-finite entropy; lower method.lr"
                        )
                    loss.backward()
                    total += float(loss.detach())
                if old_rows:
                    for r in routers.values():
                        for k in ("w", "b"):
                            r[k].grad[:old_rows] = 0
                opt.step()
                opt.zero_grad(set_to_none=True)
                curve.append(total / len(streams))
        self.ctx.record("entropy_curve", subsample(curve))
        self.ctx.record("time_tta_s", time.perf_counter() - t0)
        for n, r in routers.items():
            extra.update({f"{n}/router.{k}": v.detach().contiguous() for k, v in r.items()})

    def _stream(self, data: Any, key: tuple) -> Any:
        """Unlabeled inputs of one task: the whole split shuffled (``seed_samples=0``), or a seeded subset
        (per class on vision, in total on text) cycled in reshuffled batches."""
        o, bb = self.options(), self.ctx.backbone
        seed = self.ctx.seed_for("wemoe", *key)
        if o.max_steps == 0:  # no adaptation: no data is read
            return iter(())
        if o.adapt_split == "test":
            self.ctx.record("wemoe_test_leakage", True)
        if o.seed_samples == 0:
            return (b["inputs"] for b in data.batches(o.adapt_split, o.batch_size, seed))
        pad = getattr(getattr(bb, "tokenizer", None), "pad_token_id", None) or 0
        text = bb.modality == "text"
        seeds = sample_seeds(data, o.adapt_split, o.seed_samples, not text, seed, int(bb.batch_size), pad)
        self.ctx.record("wemoe_seed_samples", len(seeds))
        return (seeds.batch(idx)[0] for idx in seeds.batches(o.batch_size, seed + 1))

    # ---- protocols -----------------------------------------------------------------------------------------------
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        o, t = self.options(), state.step + 1
        if t == 1:
            self.ctx.record("wemoe_options", asdict(o))
        tv = task.task_vector(pretrained)
        merged = {k: v + o.scaling * tv[k] for k, v in state.merged.items()}
        extra, ranks = (
            dict(state.extra),
            [*state.scalars.get("wemoe_ranks", []), o.lora_rank_first if t == 1 else o.lora_rank],
        )
        self._add_experts(extra, [tv], state.step)
        del tv
        self._grow_routers(extra, pretrained, t)
        weights = self.merged(state.advance(merged), pretrained)
        stream = self._stream(task.data, (t, "data"))
        self._adapt(
            extra, ranks, weights, [stream], [task.head], f"step {t}", 0 if o.train_old_rows else t - 1
        )
        return state.advance(merged, extra=extra, scalars={**state.scalars, "wemoe_ranks": ranks})

    def joint(self, pretrained: StateDict, tasks: Any) -> ContinualState:
        o = self.options()
        self.ctx.record("wemoe_options", asdict(o))
        state, tvs, heads, datas = self.init(pretrained), [], [], []
        merged = state.merged
        inside, _ = self._keys(pretrained)
        for task in tasks:  # the routed blocks' task vectors of all T tasks are held (memory grows with T)
            tv = task.task_vector(pretrained)
            merged = {k: v + o.scaling * tv[k] for k, v in merged.items()}
            tvs.append({k: tv[k] for k in inside})
            heads.append(task.head)
            datas.append(task.data)
            del tv
        if not tvs:
            raise UserError("WEMoE joint merge needs at least one task")
        extra, n = dict(state.extra), len(tvs)
        self._add_experts(extra, tvs, 0)
        del tvs
        for blk in self.blocks():
            r = self._new_router(blk, pretrained, n, ("joint",))
            r.update(
                {
                    k: extra[f"{blk.name}/router.{k}"]
                    for k in ("w1", "b1")
                    if f"{blk.name}/router.{k}" in extra
                }
            )
            extra.update({f"{blk.name}/router.{k}": v for k, v in r.items()})
        ranks = [o.lora_rank] * n
        weights = self.merged(ContinualState(n, merged), pretrained)
        streams = [self._stream(d, ("joint", j)) for j, d in enumerate(datas)]
        self._adapt(extra, ranks, weights, streams, heads, "joint")
        return ContinualState(step=n, merged=merged, extra=extra, scalars={"wemoe_ranks": ranks})


__all__ = ["WEMoE", "route"]
