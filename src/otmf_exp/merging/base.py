"""The contract between the runner and a merging method: everything the runner uses is declared here.

A method sees tasks one at a time through :class:`TaskInput` and carries a
:class:`ContinualState` between steps. θ₀ stays in the backbone; earlier θ_i are never stored.
The state's type is the memory promise: one merged task vector τᵐ (weight-sized), one small
head per task, a few JSON scalars, and — for methods whose merged model is more than one weight
set (MINGLE's experts and gates) — ``extra`` tensors; ``state_growth`` declares whether the
state stays constant or grows per task.

Protocols:
  * ``continual``: ``state = init(θ₀)``; for each task ``state = step(state, task, θ₀)``; the
    runner evaluates the merged model (``merged(state, θ₀)`` run inside ``forward_context(state)``)
    on every task seen after every step, and checkpoints ``state_tensors(state)`` + ``state.scalars``.
  * ``joint``: ``state = joint(θ₀, tasks)`` sees all task inputs at once (default: fold ``step``).

Adding a method: one file in ``merging/`` with a ``MergeMethod`` subclass (``name``, ``Config``,
``step``), one line in ``merging/__init__.py`` (``METHODS``), one YAML ``conf/method/<name>.yaml``
holding only what differs from the dataclass (usually just its defaults line). docs/extending.md.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.task_vectors import (
    StateDict,
    apply,
    check_compatible,
    num_bytes,
    task_vector,
    zeros_like,
)

log = logging.getLogger(__name__)

#: values of :attr:`MergeMethod.state_growth`
GROWTHS = ("constant", "per_task")
_UNSET: Any = object()


@dataclass
class ContinualState:
    """What a method carries from step to step (checkpointed by the runner after every step).

    Attributes:
        step: number of tasks merged so far (0 after ``init``).
        merged: the merged task vector τᵐ = θ_merged − θ₀, one tensor per mergeable parameter.
        heads: per-task classification heads ``[C, D]`` (vision) that evaluation must use;
            tasks absent here use their zero-shot head. Small: C·D floats per task.
        scalars: JSON-serialisable method scalars (e.g. OPCM's λ and task-vector norms).
        extra: method tensors that are not a merged task vector (e.g. MINGLE's experts, gate
            rows and input subspace), by name; checkpointed and counted like the rest.
    """

    step: int
    merged: StateDict
    heads: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)

    def advance(
        self,
        merged: StateDict | None = None,
        *,
        heads: dict[str, Tensor] | None = None,
        scalars: dict[str, Any] | None = None,
        extra: dict[str, Tensor] | None = None,
        step: int = _UNSET,
    ) -> ContinualState:
        """The state after one more task (``step + 1``): the given fields replace this state's,
        the others are shallow copies (this state is never modified)."""
        return replace(
            self,
            step=self.step + 1 if step is _UNSET else step,
            merged=self.merged if merged is None else merged,
            heads=dict(self.heads if heads is None else heads),
            scalars=dict(self.scalars if scalars is None else scalars),
            extra=dict(self.extra if extra is None else extra),
        )

    def nbytes(self) -> int:
        """Bytes of every tensor the state carries (merged, heads, extra)."""
        return num_bytes(self.merged) + num_bytes(self.heads) + num_bytes(self.extra)


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
        last: this is the run's final task (set by the runner); a method may finish work here
            (OTMF's ``head_tuning.which=authors`` also tunes the last task's head).
    """

    name: str
    index: int
    weights: StateDict
    head: Tensor | None
    data: Any
    previous_data: Any = None
    seen_data: dict[str, Any] = field(default_factory=dict)
    owned: bool = False
    last: bool = False
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
    """Services the runner lends a method: the backbone (forward passes), device, RNG, logging.

    ``seed`` is the run's top-level ``seed``; :meth:`seed_for` derives every random stream of a
    method from it and the step, so a resumed run replays exactly what an uninterrupted one does.
    """

    backbone: Any
    device: torch.device
    generator: torch.Generator
    progress: bool = True
    record: Callable[[str, Any], None] = lambda key, value: None
    seed: int = 0

    def seed_for(self, *parts: Any) -> int:
        """A 63-bit seed derived from the run's ``seed`` and ``parts`` (e.g. ``("otmf", t, "pre")``)."""
        import hashlib

        digest = hashlib.sha256(repr((int(self.seed), *parts)).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


class MergeMethod(ABC):
    """Base class of every merging method; the runner uses exactly what is declared here.

    Class attributes (override in the subclass):
        name: config option name = module name = W&B ``method`` value.
        Config: the dataclass schema of ``method.*`` (its defaults are the single source of truth).
        protocols: the protocols the method supports (``continual``, ``joint``).
        main_coef: the ``Config`` field that the top-level ``alpha`` sets (None: alpha is refused).
        evaluates_individually: the runner evaluates task i with θ_i instead of the merged model
            (the ``individual`` reference).
        state_growth: ``constant`` (carried state independent of T) or ``per_task`` (grows by a
            fixed amount per task, e.g. MINGLE's experts); the bounded-memory test checks it.
        modalities: the backbone modalities (``vision``, ``text``) the method supports; another
            backbone is refused in one line when the method is built.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    protocols: ClassVar[tuple[str, ...]] = ("continual", "joint")
    main_coef: ClassVar[str | None] = None
    evaluates_individually: ClassVar[bool] = False
    state_growth: ClassVar[str] = "constant"
    modalities: ClassVar[tuple[str, ...]] = ("vision", "text")

    def __init__(self, cfg: Any, ctx: MethodContext, protocol: str = "continual") -> None:
        backbone = getattr(ctx, "backbone", None)
        modality = getattr(backbone, "modality", None)
        if modality is not None and modality not in self.modalities:
            raise UserError(
                f"method {self.name!r} supports {'/'.join(self.modalities)} backbones, not "
                f"{getattr(backbone, 'name', modality)!r} ({modality})"
            )
        self.cfg = cfg
        self.ctx = ctx
        self.protocol = protocol

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise :class:`~otmf_exp.errors.UserError` (one line) for a bad ``method.*`` value; runs
        before any heavy work. Default: nothing beyond the schema's types."""
        return None

    def state_growth_bytes(self, pretrained: StateDict) -> int:
        """Bytes the carried state's tensors (heads excluded) grow by with each task, for
        ``self.ctx.backbone``: 0 for ``constant`` methods; a ``per_task`` method computes it from the
        shapes it adds to (the bounded-memory test checks the measured growth equals it)."""
        return 0

    # ---- the protocols ----------------------------------------------------------------------------
    def init(self, pretrained: StateDict) -> ContinualState:
        """The state before the first task: τᵐ = 0."""
        return ContinualState(step=0, merged=zeros_like(pretrained))

    @abstractmethod
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        """Merge one new task into the state; must not modify ``state`` in place (use
        ``state.advance(...)``). May consume ``task`` (``task.task_vector`` reuses θ_t's memory)."""

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        """Joint protocol: default folds :meth:`step` over the tasks in the given order."""
        state = self.init(pretrained)
        for task in tasks:
            state = self.step(state, task, pretrained)
        return state

    # ---- the merged model -------------------------------------------------------------------------
    def merged(self, state: ContinualState, pretrained: StateDict) -> StateDict:
        """Merged mergeable weights θ₀ + τᵐ, run by the backbone's functional forward."""
        return apply(pretrained, state.merged)

    def forward_context(self, state: ContinualState) -> AbstractContextManager[Any]:
        """Modules the merged model adds around the functional forward of :meth:`merged` (e.g.
        gated experts hooked onto linear layers), active inside the returned context. Every
        forward the runner makes with the merged model (evaluation, features) runs inside it, one
        task's batches at a time. Default: none."""
        return nullcontext()

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_tensors(self, state: ContinualState) -> dict[str, Tensor]:
        """Every tensor of ``state`` under a unique name (safetensors); scalars go to JSON."""
        out = {f"merged/{k}": v for k, v in state.merged.items()}
        out.update({f"heads/{k}": v for k, v in state.heads.items()})
        out.update({f"extra/{k}": v for k, v in state.extra.items()})
        return out

    def check_state(self, state: ContinualState, pretrained: StateDict) -> None:
        """Raise ``ValueError`` naming the first mismatch when a (loaded) ``state`` does not fit the
        model: by default ``merged`` holds a tensor of the right shape for every mergeable
        parameter, or nothing (the merged model is θ₀ plus the method's own modules)."""
        if state.merged:
            check_compatible(state.merged, pretrained, "checkpoint and model")

    def load_state(self, step: int, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> ContinualState:
        """Inverse of :meth:`state_tensors`. Each tensor is copied into fresh memory: safetensors'
        buffers are only 8-byte aligned, and CPU kernels may round differently on unaligned inputs
        (a resumed run would then drift from an uninterrupted one in the last bits)."""
        parts: dict[str, dict[str, Tensor]] = {"merged": {}, "heads": {}, "extra": {}}
        for key, v in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in parts or not name:
                raise ValueError(f"unexpected tensor {key!r} in the checkpoint")
            parts[kind][name] = v.clone()
        return ContinualState(step, parts["merged"], parts["heads"], dict(scalars), parts["extra"])
