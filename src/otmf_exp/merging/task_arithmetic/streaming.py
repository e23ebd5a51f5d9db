"""Cache-sized passes for the joint folds of the element-wise merges (averaging, MagMax): same bits, one trip to memory.

An element-wise rule such as τᵐ ← (t−1)/t·τᵐ + (1/t)·(θ_t − θ₀) is three or four torch ops; run one
after another over whole tensors, each op streams the model through memory again. Run over slices of
:data:`CHUNK` elements instead, the later ops find the slice in cache: the same ops on the same
elements in the same order (the bits cannot change: every op is element-wise), about half the time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor

from otmf_exp.merging.base import TaskInput
from otmf_exp.merging.task_vectors import StateDict, check_compatible

#: elements per slice: three float32 slices (θ_t, θ₀, τᵐ) fit a core's L2 cache
CHUNK = 1 << 16


def slices(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Matching flat slices of same-shape tensors (whole tensors when one is not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for i in range(0, flat[0].numel(), CHUNK):
        yield tuple(f[i : i + CHUNK] for f in flat)


def raw_weights(task: TaskInput, pretrained: Mapping[str, Tensor]) -> tuple[StateDict, bool]:
    """``(tensors, subtract)``: θ_t's own buffers and True when the fold may turn them into τ_t itself,
    slice by slice (owned weights, τ_t not made yet, no tied tensors: exactly when
    :meth:`TaskInput.task_vector` would subtract in place; ``task.weights`` is then cleared, as it
    does); else τ_t from :meth:`TaskInput.task_vector` (new tensors, or the task's own) and False."""
    weights = task.weights
    if task.owned and weights is not None and getattr(task, "_vector", None) is None:
        check_compatible(weights, pretrained)
        ptrs = [v.untyped_storage().data_ptr() for v in weights.values()]
        if len(set(ptrs)) == len(ptrs):
            task.weights = None  # now ours: τ_t after the fold's subtraction
            return {k: weights[k] for k in pretrained}, True
    return task.task_vector(pretrained), False
