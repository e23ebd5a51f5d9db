"""OTMF's masks: the masked merge τᵐ = α·(M_pre ⊙ τᵐ_prev) + (1−α)·(M_post ⊙ τ_new), the mask
parameters (identity or 2·sigmoid, element or tensor granularity) and their fused Adam, stepped
after the backward or inside it (:class:`BackwardAdam`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from otmf_exp.merging.task_vectors import StateDict


def masked_merge(
    tv_prev: StateDict, tv_new: StateDict, m_pre: StateDict | None, m_post: StateDict | None, alpha: float
) -> StateDict:
    """τᵐ = α·(M_pre ⊙ τᵐ_prev) + (1−α)·(M_post ⊙ τ_new); ``None`` masks mean all-ones."""
    out = {}
    for k in tv_prev:
        a = tv_prev[k] if m_pre is None else m_pre[k] * tv_prev[k]
        b = tv_new[k] if m_post is None else m_post[k] * tv_new[k]
        out[k] = alpha * a + (1.0 - alpha) * b
    return out


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype OTMF computes a tensor's masks, student weights and features in: float64 for float64
    parameters (parity's float64 rows), float32 otherwise (half-precision models included)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Masks:
    """Raw mask parameters and their map to M (identity or 2·sigmoid); ``best`` is a preallocated copy.
    Each mask is in :func:`compute_dtype` of its tensor in ``like``."""

    def __init__(self, like: StateDict, param: str, granularity: str) -> None:
        self.sigmoid = param == "sigmoid"
        self.init = init = 0.0 if self.sigmoid else 1.0
        self.raw = {
            k: torch.full(
                v.shape if granularity == "element" else (),
                init,
                dtype=compute_dtype(v),
                device=v.device,
                requires_grad=True,
            )
            for k, v in like.items()
        }
        self._best: StateDict | None = None
        #: the held copy is the initial value (the mask was untouched): no tensor is kept
        self._best_is_init = False
        #: where the copy goes instead of device memory (a :class:`~otmf_exp.runtime.offload.SpilledCopy`,
        #: ``method.offload``); None: a preallocated clone
        self.spill = None

    def values(self, grad: bool = True) -> StateDict:
        """M; with ``grad=False`` a constant (no autograd graph, no gradient buffer for this mask)."""
        return {k: self.value(k, grad) for k in self.raw}

    def value(self, k: str, grad: bool = True) -> Tensor:
        """M for key ``k`` alone (see :meth:`values`)."""
        r = self.raw[k] if grad else self.raw[k].detach()
        return 2.0 * torch.sigmoid(r) if self.sigmoid else r

    def at_init(self) -> bool:
        """Whether every entry still has the initial value's exact bits (never stepped since reset)."""
        ints = {torch.float32: torch.int32, torch.float64: torch.int64}

        def same(r: Tensor) -> bool:
            bits = torch.tensor(self.init, dtype=r.dtype).view(ints[r.dtype])
            return bool((r.detach().view(ints[r.dtype]) == bits).all())

        return all(same(r) for r in self.raw.values())

    def save_best(self) -> None:
        """Copy the current masks into one preallocated buffer (no new allocation per improvement);
        masks still at their initial value are not copied (:meth:`load_best` refills them: −1 W
        while ``best_masks=on_write`` holds the copy of a side not yet stepped)."""
        with torch.no_grad():
            self._best_is_init = self.at_init()
            if self._best_is_init:
                if self._best is None:
                    self._best = {}
            elif self.spill is not None:  # off the device: written now, read back by load_best
                self.spill.save(self.raw)
                self._best = self.spill
            elif not self._best:
                self._best = {k: r.detach().clone() for k, r in self.raw.items()}
            else:
                for k, r in self.raw.items():
                    self._best[k].copy_(r)

    @property
    def has_best(self) -> bool:
        return self._best is not None

    def drop_best(self) -> None:
        self._best, self._best_is_init = None, False

    def load_best(self) -> None:
        if self._best is not None:
            if self._best_is_init:
                self.reset()
            elif self._best is self.spill:
                with torch.no_grad():
                    self.spill.load(self.raw)
            else:
                with torch.no_grad():
                    for k, r in self.raw.items():
                        r.copy_(self._best[k])
        self._best, self._best_is_init = None, False

    def mean_abs(self) -> Tensor:
        vals = self.values()
        return sum(v.abs().sum() for v in vals.values()) / sum(v.numel() for v in vals.values())

    def reset(self) -> None:
        """Back to the initial masks (1, or logits 0 for sigmoid), in place."""
        with torch.no_grad():
            for r in self.raw.values():
                r.fill_(0.0 if self.sigmoid else 1.0)

    def free_grads(self) -> None:
        for r in self.raw.values():
            r.grad = None


class BestOnWrite:
    """``best_masks=on_write``: the authors' best pair (both masks as they are after the lowest-loss
    iteration's step) kept by copy-on-write. :meth:`before_step` runs once per iteration, with its
    loss, before its step changes the masks of ``changed``: an improving iteration drops every copy
    (its own result is the new best); otherwise a side about to change is copied first, unless it
    already was since the best. At most one side is held (with :attr:`Masks.spill` on both sides,
    ``method.offload``, the copies are off the device and both may be held: never a replay): when
    a second would be needed, the copies are dropped and :attr:`replay` is set (the best pair is then re-derived by replaying the seeded
    optimisation up to the best iteration, as ``best_masks=replay``) until the next improvement. The
    last iteration's step is skipped when it does not improve (``skip_last``: nothing returned
    depends on it). Memory: ≤ 1 W (alternate schedule, the usual pattern — pre losses improve, post
    ones do not — 1 W from a post step to the next pre forward, no replay; 0 W for the copy
    before a side's first step, which is its initial value: :meth:`Masks.save_best`)."""

    def __init__(self, sides: Mapping[str, Masks], last: int, skip_last: bool) -> None:
        self.sides, self.last, self.skip_last = sides, last, skip_last
        self.best = float("inf")
        #: the held copies were dropped: the best pair must be replayed
        self.replay = False

    def before_step(self, i: int, value: float, changed: tuple[str, ...]) -> bool:
        """False: skip iteration ``i``'s step (and backward)."""
        if value < self.best:
            self.best, self.replay = value, False
            self._drop()
            return True
        if self.skip_last and i == self.last:
            return False
        need = [s for s in changed if not self.sides[s].has_best]
        if self.replay or not need:
            return True
        capped = any(m.spill is None for m in self.sides.values())  # copies held off the device: no cap
        if capped and sum(m.has_best for m in self.sides.values()) + len(need) > 1:
            self._drop()
            self.replay = True
            return True
        for s in need:
            self.sides[s].save_best()
        return True

    def _drop(self) -> None:
        for m in self.sides.values():
            m.drop_best()

    def finish(self) -> None:
        """The best pair back into the masks (a side never copied is already the best); with
        :attr:`replay` the caller replays instead."""
        for m in self.sides.values():
            m.load_best()


def adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam; the fused kernel where torch has one (float32 on CPU/CUDA): no list-of-temporaries
    copies of the masks (torch's foreach path) and ~10x faster on CPU than the for-loop path."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def layer_key(name: str) -> str:
    """The group of a parameter name: its prefix up to the first numeric component (the transformer
    layer it belongs to, e.g. ``vision_model.encoder.layers.3``), else the name itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


class BackwardAdam:
    """Adam on masks stepped inside the backward: one fused Adam per (side, layer) group of mask
    tensors, stepped by a post-accumulate-grad hook as soon as every tensor of the group has its
    gradient, which is then freed — so at most about one layer's mask gradients are alive, never a
    whole mask's. :meth:`flush` after the backward steps the groups some of whose tensors got no
    gradient. Fused Adam's arithmetic is per tensor, so the masks equal those of one Adam stepped
    after the backward, bit for bit. Use as a context manager (the hooks are removed on exit).

    ``hooks=False``: no hooks; :meth:`step_sides` steps every group of the given sides after the
    backward (the same arithmetic as one Adam per side). ``offload``: the groups' Adam moments live
    in an :class:`~otmf_exp.runtime.offload.OffloadedMoments` store between their steps
    (``offload_dir``: its directory on the CPU)."""

    def __init__(
        self,
        sides: Mapping[str, Mapping[str, Tensor]],
        lr: float,
        *,
        hooks: bool = True,
        offload: bool = False,
        offload_dir: str | None = None,
    ) -> None:
        groups: dict[tuple[str, str], list[Tensor]] = {}
        for side, raw in sides.items():
            for name, p in raw.items():
                groups.setdefault((side, layer_key(name)), []).append(p)
        self.keys = list(groups)
        self.groups = list(groups.values())
        self.opts = [adam(g, lr) for g in self.groups]
        self.group_of = {p: i for i, g in enumerate(self.groups) for p in g}
        self.ready = [0] * len(self.groups)
        self.offload = None
        if offload and self.groups:
            from otmf_exp.runtime.offload import OffloadedMoments

            self.offload = OffloadedMoments(self.groups, self.groups[0][0].device, offload_dir)
        self.handles = (
            [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.group_of] if hooks else []
        )

    def _accumulated(self, p: Tensor) -> None:
        i = self.group_of[p]
        self.ready[i] += 1
        if self.ready[i] == len(self.groups[i]):
            self._step(i)

    def _step(self, i: int) -> None:
        if self.offload is not None:
            self.offload.load(i, self.opts[i])
        self.opts[i].step()
        if self.offload is not None:
            self.offload.store(i, self.opts[i])
        self.opts[i].zero_grad(set_to_none=True)
        self.ready[i] = 0

    def flush(self) -> None:
        for i, n in enumerate(self.ready):
            if n:
                self._step(i)

    def step_sides(self, sides: tuple[str, ...]) -> None:
        """Step every group of ``sides`` (``hooks=False``: after the backward), gradients freed."""
        for i, (side, _) in enumerate(self.keys):
            if side in sides:
                self._step(i)

    def __enter__(self) -> BackwardAdam:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        if self.offload is not None:
            self.offload.close()
