"""AdaMerging's options as the compared papers ran it (Yang et al., ICLR 2024; the OTMF authors' and
MINGLE's continual scripts): batch streams, seed-sample pools, the clamp modes and AdaMerging++'s
TIES pruning of the task vectors (reusing ``merging/task_arithmetic/ties.py``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from otmf_exp.data.base import TaskData, index_plan
from otmf_exp.merging.adaptation import sample_seeds
from otmf_exp.merging.sparsify import SCOPES, elect_signs, trim
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)

CONTINUAL = ("pairwise", "current_only")
CLAMPS = ("none", "merge", "project")
#: the old boolean ``clamp`` (true = the projection after the step, this project's former option)
CLAMP_BOOLS = {"true": "project", "false": "none"}
STREAMS = ("per_step", "per_step_cycle", "per_task_cycle")
PRUNES = ("none", "ties")
#: the string options of ``AdaMergingConfig`` checked here (granularity, backward: ``adamerging``)
CHOICES = {
    "adapt_split": ("train", "validation", "test"),
    "continual": CONTINUAL,
    "stream": STREAMS,
    "tv_prune": PRUNES,
    "ties_topk_scope": SCOPES,
}


def clamp_mode(value: Any) -> str:
    """``none | merge | project``; the old booleans map true -> project, false -> none."""
    v = str(value).lower()
    return CLAMP_BOOLS.get(v, v)


def replay(data: TaskData, split: str, batch_size: int, seed: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """``itertools.cycle`` over one shuffled pass (seeded): the first pass, then the same batches again
    and again, no reshuffle (the OTMF authors' streams), starting after ``skip`` batches. Re-reads the
    pass instead of caching it (same batches, no copy of the pool in memory)."""
    n_batches = math.ceil(data.size(split) / batch_size)
    if n_batches == 0:
        raise ValueError(f"task {data.name!r}: split {split!r} is empty")
    skip %= n_batches
    while True:
        for i, batch in enumerate(data.loader(split, batch_size, shuffle=True, seed=seed)):
            if i >= skip:
                yield batch
        skip = 0


class SeedPool(TaskData):
    """A task's few seed samples (MINGLE's ``select_seed_subset``: k per class) as an adaptation pool:
    every split name reads the same samples."""

    def __init__(self, name: str, seeds: Any) -> None:
        self.name, self.seeds, self.classnames = name, seeds, None

    def size(self, split: str) -> int:
        return len(self.seeds)

    def loader(self, split, batch_size, *, shuffle=False, seed=0, fraction=1.0):
        for idx in index_plan(len(self.seeds), batch_size, shuffle=shuffle, seed=seed, fraction=fraction):
            yield {"inputs": self.seeds.batch(idx)[0]}


def ties_prune(tvs: Sequence[Mapping[str, Tensor]], density: float, scope: str) -> list[StateDict]:
    """AdaMerging++: trim each task vector to its top-``density`` magnitudes, elect signs over the
    trimmed vectors and keep, per vector, only the entries agreeing with the elected sign (TIES'
    ``disjoint_merge_split`` without the sum: each vector keeps its own coefficient)."""
    trimmed = [trim(tv, density, scope) for tv in tvs]
    signs = elect_signs(trimmed, scope)
    return [
        {k: v * torch.where(signs[k] > 0, v > 0, v < 0).to(v.dtype) for k, v in t.items()} for t in trimmed
    ]


def prune(cfg: Any, tvs: Sequence[StateDict]) -> Sequence[StateDict]:
    """``tvs`` as adapted: unchanged, or pruned for AdaMerging++ (``tv_prune=ties``)."""
    if cfg.tv_prune == "none":
        return tvs
    return ties_prune(tvs, cfg.ties_density, cfg.ties_topk_scope)


def adaptation_pool(cfg: Any, ctx: Any, data: TaskData) -> TaskData:
    """A task's adaptation pool: its ``adapt_split``, or ``seed_samples`` per class of it (seeded by
    the run's ``seed`` and the task: the same samples whenever the task is adapted on)."""
    k = cfg.seed_samples
    if k is None:
        return data
    if cfg.adapt_split == "test":
        log.warning("AdaMerging adapts on seed samples of the test split: test-set leakage (steps.jsonl)")
        ctx.record("adamerging_seed_test_leakage", True)
    bb = ctx.backbone
    pad = getattr(getattr(bb, "tokenizer", None), "pad_token_id", None) or 0
    seed = ctx.seed_for("adamerging", "seeds", data.name)
    return SeedPool(data.name, sample_seeds(data, cfg.adapt_split, k, True, seed, int(bb.batch_size), pad))


def batch_streams(
    cfg: Any, ctx: Any, datas: Sequence[TaskData], key: tuple[Any, ...], skips: Sequence[int]
) -> list[Iterator[dict[str, Any]]]:
    """One batch stream per pool, per ``cfg.stream``: ``per_step`` and ``per_step_cycle`` seeded by
    ``key`` (the step) and the pool's position, ``per_task_cycle`` by the task alone, starting after
    ``skips[j]`` batches (those earlier steps drew)."""
    seed, split, bs = ctx.seed_for, cfg.adapt_split, cfg.batch_size
    if cfg.stream == "per_step":
        return [d.batches(split, bs, seed("adamerging", *key, j)) for j, d in enumerate(datas)]
    if cfg.stream == "per_step_cycle":
        return [replay(d, split, bs, seed("adamerging", *key, j)) for j, d in enumerate(datas)]
    return [replay(d, split, bs, seed("adamerging", "stream", d.name), n) for d, n in zip(datas, skips)]
