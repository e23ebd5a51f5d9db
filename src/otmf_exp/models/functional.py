"""Running one module with other weights, without copying it.

``torch.func.functional_call`` covers ``forward``; three helpers cover the rest:

* :func:`submodule_params` renames full-model weights for a submodule (e.g. T5's encoder), following
  tied parameters (T5's ``shared.weight`` is also ``encoder.embed_tokens.weight``).
* :func:`swapped_parameters` temporarily puts given tensors in place of a module's parameters, for
  code paths that are not a single forward call (``generate``). Every location that holds a
  swapped parameter (ties included) sees the new tensor; the originals are restored in
  ``finally``, also when the body raises. Not re-entrant and not thread-safe for the same
  module: one swap at a time.
* :class:`ComputedParams` + :func:`computed_parameters`: weights computed per module as it runs
  (and recomputed in the backward) instead of a whole dict alive for the forward and backward;
  optionally each transformer layer checkpointed (its activations re-made in the backward too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


def _locations(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (owning module, attribute name) that holds it."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, attr))
    return out


def submodule_params(module: nn.Module, params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``params`` (canonical names of ``module``) as names inside ``module.get_submodule(prefix)``."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    sub = module.get_submodule(prefix)
    out = {}
    for name, p in sub.named_parameters(remove_duplicate=False):
        full = canonical.get(id(p))
        if full is not None and full in params:
            out[name] = params[full]
    return out


@contextmanager
def swapped_parameters(module: nn.Module, params: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Within the block, ``module`` computes with ``params`` (by canonical parameter name).

    Names absent from ``params`` keep their values. Shapes must match. Restores the original
    ``nn.Parameter`` objects on exit (normal or exceptional).
    """
    named = dict(module.named_parameters())
    where = _locations(module)
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, value in params.items():
            if name not in named:
                raise KeyError(f"{name!r} is not a parameter of {type(module).__name__}")
            orig = named[name]
            if tuple(value.shape) != tuple(orig.shape):
                raise ValueError(f"{name!r}: shape {tuple(value.shape)} != {tuple(orig.shape)}")
            for mod, attr in where[id(orig)]:
                saved.append((mod, attr, mod._parameters[attr]))
                mod._parameters[attr] = value  # a plain tensor is fine inside _parameters
        yield module
    finally:
        for mod, attr, orig in reversed(saved):
            mod._parameters[attr] = orig


class ComputedParams:
    """Parameters given by a function, ``make(name, grad) -> Tensor``, for the canonical ``names``.

    Passed where a weight dict is expected (``Backbone.call``): each weight is made when the module
    that owns it runs and dropped when it returns; autograd keeps the recipe instead of the weight
    and re-makes it (``grad=False``) when the backward needs it. So at most one module's weights are
    alive at a time beyond what the recipes hold (masks, task vectors), for the price of one more
    ``make`` per weight in the backward. ``make`` must be deterministic: the backward sees bit for
    bit the weight the forward used.

    ``checkpoint_blocks``: each layer of the module's layer lists (the children of the outermost
    ``nn.ModuleList`` s that hold computed weights: transformer blocks) runs under non-reentrant
    activation checkpointing (``torch.utils.checkpoint``) with its weights made inside, so autograd
    keeps only each layer's inputs, and the backward re-runs one layer at a time (weights re-made)
    — the same values bit for bit, one more forward per backward. Only where grad is enabled.

    ``probe``: a list; with ``checkpoint_blocks`` the first layer then runs *without* checkpointing
    and the bytes of the activations autograd saves inside it (distinct storages of tensors this
    forward made: computed weights and leaves such as θ₀, τ or the masks, which live anyway,
    excluded) are appended to ``probe`` with the number of layers, ``(bytes, layers)`` — one layer's
    activation size, measured, for deciding whether the next forwards can skip checkpointing.
    ``decide``: called right after that measurement; its answer sets ``checkpoint_blocks`` for the
    remaining layers of the same forward (so a step that fits never re-runs a layer).
    """

    def __init__(
        self,
        make: Callable[[str, bool], Tensor],
        names: Iterable[str],
        checkpoint_blocks: bool = False,
        probe: list[tuple[int, int]] | None = None,
        decide: Callable[[], bool] | None = None,
    ) -> None:
        self.make, self.names, self.checkpoint_blocks = make, set(names), checkpoint_blocks
        self.probe, self.decide = probe, decide


#: modules whose forward reads a child's parameters without calling the child
_READS_CHILDREN: dict[type, tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}

#: (module whose parameter it is, attribute, canonical name) of each computed parameter a module fills
_Slots = dict[nn.Module, list[tuple[nn.Module, str, str]]]


class _Recipe:
    """A saved tensor that autograd holds as the name of a computed weight and its view geometry."""

    __slots__ = ("name", "size", "stride", "offset")

    def __init__(self, name: str, x: Tensor) -> None:
        self.name, self.size, self.stride, self.offset = name, x.size(), x.stride(), x.storage_offset()


def _owned(module: nn.Module, names: set[str]) -> _Slots:
    """Module -> the computed parameters it fills when it runs (its own; ``out_proj``'s for MHA)."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    unknown = names - set(canonical.values())
    if unknown:
        raise KeyError(f"{sorted(unknown)[0]!r} is not a parameter of {type(module).__name__}")
    owned: _Slots = {}
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None and canonical.get(id(p)) in names:
                owned.setdefault(mod, []).append((mod, attr, canonical[id(p)]))
        for child in _READS_CHILDREN.get(type(mod), ()):  # a parent's forward reads them directly
            sub = getattr(mod, child)
            for attr, p in sub._parameters.items():
                if p is not None and canonical.get(id(p)) in names:
                    owned.setdefault(mod, []).append((sub, attr, canonical[id(p)]))
    return owned


def layer_blocks(module: nn.Module, owned: Iterable[nn.Module]) -> list[nn.Module]:
    """The children of the outermost ``nn.ModuleList`` s below ``module`` that contain a module of
    ``owned`` (the transformer layers of every supported architecture)."""
    owners = set(owned)
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                layers = [c for c in child if any(x in owners for x in c.modules())]
                if layers:
                    out.extend(layers)
                    continue
            visit(child)

    visit(module)
    return out


class _Windows:
    """Forward pre-/post-hooks that put each owner's computed weights in place while it runs."""

    def __init__(self, params: ComputedParams, owned: _Slots, live: dict[int, str] | None) -> None:
        self.params, self.owned, self.live = params, owned, live
        self.stack: list[list[tuple[nn.Module, str, Tensor | None, int]]] = []

    def pre(self, mod: nn.Module, args: Any = ()) -> None:
        frame = []
        for m, attr, name in self.owned[mod]:
            w = self.params.make(name, torch.is_grad_enabled())
            frame.append((m, attr, m._parameters[attr], w.untyped_storage().data_ptr()))
            m._parameters[attr] = w  # a plain tensor is fine inside _parameters
            if self.live is not None and w.numel():
                self.live[frame[-1][3]] = name
        self.stack.append(frame)

    def post(self, mod: nn.Module, args: Any = (), out: Any = None) -> None:
        for m, attr, orig, ptr in reversed(self.stack.pop()):
            m._parameters[attr] = orig
            if self.live is not None:
                self.live.pop(ptr, None)

    def hook(self, mods: Iterable[nn.Module]) -> list[Any]:
        handles = []
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(self.pre))
            handles.append(mod.register_forward_hook(self.post, always_call=True))
        return handles


def _checkpointed(
    block: nn.Module, params: ComputedParams, owned: _Slots, inside: list[nn.Module], live: dict[int, str]
) -> Callable[..., Any]:
    """``block.forward`` under activation checkpointing, the computed weights of ``inside`` (the
    block's owning modules) made inside the checkpointed function (by hooks it installs itself, so
    the backward's re-run finds them too). Once ``params.checkpoint_blocks`` is turned off (the
    probe's decision), the block runs plainly, its weights saved as recipes (``live``)."""
    forward = block.forward

    def run(*args: Any, _live: dict[int, str] | None = None, **kwargs: Any) -> Any:
        windows = _Windows(params, owned, _live)
        handles = windows.hook(m for m in inside if m is not block)
        try:
            if block in owned:  # its own parameters: forward is called directly, not through hooks
                windows.pre(block)
                try:
                    return forward(*args, **kwargs)
                finally:
                    windows.post(block)
            return forward(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        if not params.checkpoint_blocks:
            return run(*args, _live=live, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed


@contextmanager
def computed_parameters(module: nn.Module, params: ComputedParams) -> Iterator[nn.Module]:
    """Within the block, every forward of ``module`` (or of any submodule) computes with
    ``params``: forward pre-hooks put each owning module's weights in place (each location of a
    tied parameter is filled by its own module; ``nn.MultiheadAttention`` also fills ``out_proj``,
    which its forward reads directly), forward hooks take them out again, and outside those windows
    every computed parameter reads as NaN (a read that bypasses its module shows up as a non-finite
    result, never as silently pre-trained weights); saved-tensor hooks store a
    :class:`_Recipe` for any tensor that autograd would save and that lives in a computed weight's
    memory (the weight or a view such as ``weight.t()``). With ``params.checkpoint_blocks`` the
    layers of :func:`layer_blocks` run checkpointed (their own hooks, inside the checkpoint)."""
    owned = _owned(module, params.names)
    blocks = layer_blocks(module, owned) if params.checkpoint_blocks else []
    probe = blocks.pop(0) if blocks and params.probe is not None and torch.is_grad_enabled() else None
    inside = {b: [m for m in b.modules() if m in owned] for b in blocks}
    in_blocks = {m for mods in inside.values() for m in mods}
    live: dict[int, str] = {}  # storage address of a computed weight -> its name, while it is in place
    windows = _Windows(params, owned, live)
    probed: dict[int, int] | None = None  # storage address -> bytes, saved inside the probe layer

    def pack(x: Tensor) -> Any:
        if live and x.layout == torch.strided and x.device.type != "meta":
            name = live.get(x.untyped_storage().data_ptr())
            if name is not None:
                return _Recipe(name, x)
        # made by this forward (a graph node): not a leaf that lives anyway (θ₀, τ, the masks)
        if (
            probed is not None
            and isinstance(x, Tensor)
            and x.layout == torch.strided
            and x.grad_fn is not None
        ):
            probed[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    def probe_in(mod: nn.Module, args: Any = ()) -> None:
        nonlocal probed
        probed = {}

    def probe_out(mod: nn.Module, args: Any = (), out: Any = None) -> None:
        nonlocal probed
        if probed is not None:
            params.probe.append((sum(probed.values()), len(blocks) + 1))
            if params.decide is not None:  # the rest of this forward follows the decision
                params.checkpoint_blocks = bool(params.decide())
        probed = None

    def unpack(x: Any) -> Tensor:
        if isinstance(x, _Recipe):
            with torch.no_grad():
                return params.make(x.name, False).as_strided(x.size, x.stride, x.offset)
        return x

    originals = [(m, attr, m._parameters[attr]) for slots in owned.values() for m, attr, _ in slots]
    handles = []
    try:
        for m, attr, orig in originals:  # NaN outside an owner's forward: a read elsewhere shows
            m._parameters[attr] = torch.full((), float("nan"), dtype=orig.dtype, device=orig.device).expand(
                orig.shape
            )
        handles = windows.hook(m for m in owned if m not in in_blocks)
        if probe is not None:
            handles.append(probe.register_forward_pre_hook(probe_in))
            handles.append(probe.register_forward_hook(probe_out, always_call=True))
        for b in blocks:  # an instance attribute shadows the method
            b.forward = _checkpointed(b, params, owned, inside[b], live)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield module
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        for h in handles:
            h.remove()
        for m, attr, orig in originals:
            m._parameters[attr] = orig
