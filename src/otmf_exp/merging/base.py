"""The contract between the runner and a merging method.

A method sees tasks one at a time through :class:`TaskInput` and carries a
:class:`ContinualState` between steps. The state's type is the "bounded memory" promise of
continual merging: exactly one merged task vector (τᵐ, weight-sized), one small head per task
seen, and a few method scalars. θ₀ stays in the backbone; earlier τ_i are never stored.

Protocols:
  * ``continual``: ``state = init(θ₀)``; for each task ``state = step(state, task)``; the runner
    evaluates ``merged(state)`` after every step.
  * ``joint``: ``state = joint(θ₀, tasks)`` sees all task inputs at once (default: fold ``step``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from otmf_exp.merging.task_vectors import StateDict, apply, check_compatible, task_vector, zeros_like

log = logging.getLogger(__name__)


@dataclass
class ContinualState:
    """What a method carries from step to step (checkpointed by the runner after every step).

    Attributes:
        step: number of tasks merged so far (0 after ``init``).
        merged: the merged task vector τᵐ = θ_merged − θ₀, one tensor per mergeable parameter.
        heads: per-task classification heads ``[C, D]`` (vision) that evaluation must use;
            tasks absent here use their zero-shot head. Small: C·D floats per task.
        scalars: JSON-serialisable method scalars (e.g. OPCM's λ and task-vector norms).
    """

    step: int
    merged: StateDict
    heads: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskInput:
    """Everything a method may use about the task arriving at this step.

    Attributes:
        name: task name (e.g. ``"mnist"``).
        index: 0-based position in the order.
        weights: θ_t, the fine-tuned mergeable parameters (same keys as θ₀).
        head: zero-shot classification head ``[C, D]`` or ``None`` (text backbones).
        data: this task's data (unlabeled adaptation pool, labeled head-tuning split).
        previous_data: data of the task merged at the previous step (``None`` at step 1);
            read by OTMF's ``pre_data=previous_task`` and continual AdaMerging.
        seen_data: data of every task seen so far, this one included; read only by options
            that explicitly revisit earlier tasks (OTMF ``head_tuning.which=all_seen``).
        owned: ``weights`` were loaded for this step alone (the runner's case), so
            :meth:`task_vector` may turn them into τ_t in place instead of allocating a copy.
    """

    name: str
    index: int
    weights: StateDict
    head: Tensor | None
    data: Any
    previous_data: Any = None
    seen_data: dict[str, Any] = field(default_factory=dict)
    owned: bool = False
    _vector: StateDict | None = field(default=None, init=False, repr=False)

    def task_vector(self, pretrained: StateDict) -> StateDict:
        """τ_t = θ_t − θ₀. With ``owned`` weights, computed in place (one weight copy less at the
        step's peak), ``weights`` is cleared (read θ_t before calling this) and later calls return
        the same τ_t. Otherwise a new dict."""
        if self._vector is not None:
            return self._vector
        if not self.owned:
            return task_vector(self.weights, pretrained)
        check_compatible(self.weights, pretrained)
        ptrs = [v.untyped_storage().data_ptr() for v in self.weights.values()]
        if len(set(ptrs)) != len(ptrs):  # tied tensors: subtracting in place twice would be wrong
            return task_vector(self.weights, pretrained)
        with torch.no_grad():
            self._vector = {k: self.weights[k].sub_(pretrained[k]) for k in pretrained}
        self.weights = None  # now τ, not θ_t
        return self._vector


@dataclass
class MethodContext:
    """Services the runner lends a method: the backbone (forward passes), device, RNG, logging."""

    backbone: Any
    device: torch.device
    generator: torch.Generator
    progress: bool = True
    record: Callable[[str, Any], None] = lambda key, value: None


class MergeMethod(ABC):
    """Base class: subclasses implement ``step`` (and ``joint`` when it differs from folding)."""

    name: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]] = ("continual", "joint")
    #: name of the config field that the top-level ``alpha`` overrides (None: no coefficient)
    main_coef: ClassVar[str | None] = None

    def __init__(self, cfg: Any, ctx: MethodContext, protocol: str = "continual") -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.protocol = protocol

    def init(self, pretrained: StateDict) -> ContinualState:
        return ContinualState(step=0, merged=zeros_like(pretrained))

    @abstractmethod
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        """Merge one new task into the state; must not modify ``state`` or ``task`` in place."""

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        """Joint protocol: default folds :meth:`step` over the tasks in the given order."""
        state = self.init(pretrained)
        for task in tasks:
            state = self.step(state, task, pretrained)
        return state

    def merged(self, state: ContinualState, pretrained: StateDict) -> StateDict:
        """Full merged weights θ₀ + τᵐ."""
        return apply(pretrained, state.merged)
