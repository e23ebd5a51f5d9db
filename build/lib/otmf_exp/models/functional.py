"""Running one module with other weights, without copying it.

``torch.func.functional_call`` covers ``forward``; two helpers cover the rest:

* :func:`submodule_params` renames full-model weights for a submodule (e.g. T5's encoder), following
  tied parameters (T5's ``shared.weight`` is also ``encoder.embed_tokens.weight``).
* :func:`swapped_parameters` temporarily puts given tensors in place of a module's parameters, for
  code paths that are not a single forward call (``generate``). Every location that holds a
  swapped parameter (ties included) sees the new tensor; the originals are restored in
  ``finally``, also when the body raises. Not re-entrant and not thread-safe for the same
  module: one swap at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
