"""Test-time adaptation pieces shared by the data-driven families (AdaMerging, Concrete, MINGLE, WEMoE,
continual fine-tuning): the few seed samples a method adapts on (MINGLE, arXiv 2505.11883), the
entropy objective and the task-/layer-wise coefficients of AdaMerging (Yang et al., ICLR 2024), and
the curve subsampling every loop records."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.task_vectors import StateDict

GRANULARITIES = ("task", "layer")


MAX_CURVE_POINTS = 100


def entropy(logits: Tensor, eps: float = 0.0) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the last dim; ``logits`` ``[..., C]``.
    Range [0, log C]. Computed in float32, or float64 for float64 logits (:func:`work_dtype`);
    ``eps > 0``: FusionBench's / MINGLE's ``−Σ p·log(p + eps)`` instead of the exact log-softmax."""
    x = logits.to(work_dtype(logits.dtype))
    if eps == 0.0:
        logp = torch.log_softmax(x, dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()
    p = torch.softmax(x, dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of learned adaptation tensors (coefficients, mask logits, entropies) for parameters
    of ``dtype``: float32, or float64 for float64 parameters (half precision is learned in float32)."""
    return torch.promote_types(dtype, torch.float32)


def init_coefficients(
    n_vectors: int,
    n_tensors: int,
    granularity: str,
    values: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Coefficient tensor ``[n_vectors]`` (task) or ``[n_vectors, n_tensors]`` (layer), row i filled
    with ``values[i]``; ``dtype`` (float32 unless asked), requires grad."""
    v = torch.tensor([float(x) for x in values], dtype=dtype, device=device)
    if len(v) != n_vectors:
        raise ValueError(f"need {n_vectors} initial values, got {len(v)}")
    coef = v if granularity == "task" else v[:, None].expand(n_vectors, n_tensors).clone()
    return coef.requires_grad_(True)


def combine(pretrained: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], coef: Tensor) -> StateDict:
    """θ₀ + Σ_i λ_i ⊙ τ_i, differentiable in ``coef`` (``[n]`` task-wise or ``[n, P]`` layer-wise, P =
    number of keys in ``pretrained``, in key order)."""
    out = {}
    for j, (k, p) in enumerate(pretrained.items()):
        delta = sum((coef[i] if coef.dim() == 1 else coef[i, j]) * tv[k] for i, tv in enumerate(tvs))
        out[k] = p + delta.to(p.dtype)
    return out


def subsample(curve: Sequence[float], n: int = MAX_CURVE_POINTS) -> list[float]:
    """At most ``n`` evenly spaced points of ``curve``, first and last included."""
    if len(curve) <= n:
        return list(curve)
    idx = torch.linspace(0, len(curve) - 1, n).round().long().tolist()
    return [curve[i] for i in idx]


def coefficient_summary(coef: Tensor) -> dict[str, Any]:
    """JSON-friendly view of learned coefficients: per-vector values (task) or means (layer), min, max."""
    c = coef.detach().float().cpu()
    per_vector = c if c.dim() == 1 else c.mean(1)
    return {"per_vector": per_vector.tolist(), "min": float(c.min()), "max": float(c.max())}


# ---- seed samples ----
@dataclass
class SeedSet:
    """The few samples of one task MINGLE adapts on: image tensors, or unpadded token ids (+ answers)."""

    inputs: list[Tensor]
    targets: list[str] | None
    pad_id: int = 0
    #: inputs are 1-D token ids, re-padded per batch into ``{"input_ids", "attention_mask"}``
    text: bool = False

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: Sequence[int]) -> tuple[Any, list[str] | None]:
        """(collated inputs, answer texts or None) of the samples ``idx``."""
        targets = None if self.targets is None else [self.targets[i] for i in idx]
        if not self.text:
            return torch.stack([self.inputs[i] for i in idx]), targets
        ids = [self.inputs[i] for i in idx]
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for j, x in enumerate(ids):
            input_ids[j, : len(x)], mask[j, : len(x)] = x, 1
        return {"input_ids": input_ids, "attention_mask": mask}, targets

    def batches(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        """Endless shuffled batches (the last of an epoch may be short), a new permutation per epoch."""
        epoch = 0
        while True:
            perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            yield from (perm[i : i + batch_size] for i in range(0, len(perm), batch_size))
            epoch += 1


def _examples(batch: dict[str, Any]) -> Iterator[tuple[Any, int, str | None]]:
    x, targets = batch["inputs"], batch.get("targets")
    for i, y in enumerate(batch["labels"].tolist()):
        if isinstance(x, Tensor):
            ex = x[i].clone()
        else:
            ex = x["input_ids"][i][x["attention_mask"][i].bool()].clone()
        yield ex, y, None if targets is None else targets[i]


def sample_seeds(
    data: Any, split: str, k: int, per_class: bool, seed: int, batch_size: int, pad_id: int = 0
) -> SeedSet:
    """``k`` samples per class (one reservoir per label over one pass of ``split``; a class with
    fewer keeps all) or ``k`` in total (a fixed random subset: only those samples are read)."""
    n = data.size(split)
    if n == 0:
        raise UserError(
            f"MINGLE: task {data.name!r} has no {split!r} samples to adapt on (method.seed_split)"
        )
    if per_class:
        rng, slots, seen = random.Random(seed), {}, {}
        for batch in data.loader(split, batch_size):
            for ex in _examples(batch):
                y = ex[1]
                seen[y] = seen.get(y, 0) + 1
                lst = slots.setdefault(y, [])
                if seen[y] <= k:
                    lst.append(ex)
                elif (j := rng.randrange(seen[y])) < k:
                    lst[j] = ex
        chosen = [ex for y in sorted(slots) for ex in slots[y]]
    else:
        fraction = 1.0 if k >= n else (k - 0.5) / n  # ceil(fraction·n) = k samples exactly
        chosen = [
            ex for b in data.loader(split, batch_size, seed=seed, fraction=fraction) for ex in _examples(b)
        ]
    text = chosen[0][2] is not None
    return SeedSet([c[0] for c in chosen], [c[2] for c in chosen] if text else None, pad_id, text)
