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
  (and recomputed in the backward) instead of a whole dict alive for the forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
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
    """

    def __init__(self, make: Callable[[str, bool], Tensor], names: Iterable[str]) -> None:
        self.make, self.names = make, set(names)


#: modules whose forward reads a child's parameters without calling the child
_READS_CHILDREN: dict[type, tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}


class _Recipe:
    """A saved tensor that autograd holds as the name of a computed weight and its view geometry."""

    __slots__ = ("name", "size", "stride", "offset")

    def __init__(self, name: str, x: Tensor) -> None:
        self.name, self.size, self.stride, self.offset = name, x.size(), x.stride(), x.storage_offset()


@contextmanager
def computed_parameters(module: nn.Module, params: ComputedParams) -> Iterator[nn.Module]:
    """Within the block, every forward of ``module`` (or of any submodule) computes with
    ``params``: forward pre-hooks put each owning module's weights in place (each location of a
    tied parameter is filled by its own module; ``nn.MultiheadAttention`` also fills ``out_proj``,
    which its forward reads directly), forward hooks take them out again, and outside those windows
    every computed parameter reads as NaN (a read that bypasses its module shows up as a non-finite
    result, never as silently pre-trained weights); saved-tensor hooks store a
    :class:`_Recipe` for any tensor that autograd would save and that lives in a computed weight's
    memory (the weight or a view such as ``weight.t()``)."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    unknown = params.names - set(canonical.values())
    if unknown:
        raise KeyError(f"{sorted(unknown)[0]!r} is not a parameter of {type(module).__name__}")
    owned: dict[nn.Module, list[tuple[nn.Module, str, str]]] = {}
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None and canonical.get(id(p)) in params.names:
                owned.setdefault(mod, []).append((mod, attr, canonical[id(p)]))
        for child in _READS_CHILDREN.get(type(mod), ()):  # a parent's forward reads them directly
            sub = getattr(mod, child)
            for attr, p in sub._parameters.items():
                if p is not None and canonical.get(id(p)) in params.names:
                    owned.setdefault(mod, []).append((sub, attr, canonical[id(p)]))
    live: dict[int, str] = {}  # storage address of a computed weight -> its name, while it is in place
    stack: list[list[tuple[nn.Module, str, Tensor | None, int]]] = []

    def pre(mod: nn.Module, args: Any) -> None:
        frame = []
        for m, attr, name in owned[mod]:
            w = params.make(name, torch.is_grad_enabled())
            frame.append((m, attr, m._parameters[attr], w.untyped_storage().data_ptr()))
            m._parameters[attr] = w  # a plain tensor is fine inside _parameters
            if w.numel():
                live[frame[-1][3]] = name
        stack.append(frame)

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        for m, attr, orig, ptr in reversed(stack.pop()):
            m._parameters[attr] = orig
            live.pop(ptr, None)

    def pack(x: Tensor) -> Any:
        if live and x.layout == torch.strided and x.device.type != "meta":
            name = live.get(x.untyped_storage().data_ptr())
            if name is not None:
                return _Recipe(name, x)
        return x

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
        for mod in owned:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post, always_call=True))
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield module
    finally:
        for h in handles:
            h.remove()
        for m, attr, orig in originals:
            m._parameters[attr] = orig
