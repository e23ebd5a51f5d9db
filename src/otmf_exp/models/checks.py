"""The one tensor checker: every tensor handed on (θ₀, θ_t, heads, checkpoint state) passes here.

Checks, once per tensor per load: expected keys, shapes, a floating dtype (float16/bfloat16 are
cast to float32 with one log line; integer/bool tensors are refused, never rounded into weights)
and finiteness (one ``torch.aminmax`` pass: NaN/inf show in min/max, no bool temporary). Finite-but-absurd values (a weight ×1e30) are refused above
:data:`MAX_ABS` in the pre-trained tower only: real CLIP/T5 weights stay far below it, and a
larger one makes every logit meaningless (the issue's ACC 10.00), so it is a broken file.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)

#: largest |w| accepted in a pre-trained tower (real weights are O(1)-O(100))
MAX_ABS = 1e4
_HALF = (torch.float16, torch.bfloat16)


def from_pretrained(loader, path, **kw):
    """``loader.from_pretrained(path, **kw)``; a ``pytorch_model.bin`` holding pickled objects, which
    torch refuses under ``weights_only=True`` (correctly: unpickling runs code), is one line."""
    try:
        return loader.from_pretrained(path, **kw)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: its pytorch_model.bin holds pickled objects that torch refuses to load safely "
            "(weights_only=True); where you trust the file, convert it once to safetensors "
            "(load it with weights_only=False, then save_pretrained(dir, safe_serialization=True)) "
            "and point to that dir"
        ) from None


def check_tensor(t: Tensor, name: str, source: str, shape: Iterable[int] | None = None) -> Tensor:
    """``t`` as a finite floating tensor (half cast to float32), or one ``UserError`` line."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise UserError(f"{source}: {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype in _HALF:
        log.info("%s: %r is %s; cast to float32", source, name, str(t.dtype).removeprefix("torch."))
        t = t.float()
    elif not t.is_floating_point():
        raise UserError(
            f"{source}: {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; weights must be floating point"
        )
    if not _finite(t):
        raise UserError(f"{source}: {name!r} has non-finite values (NaN/inf)")
    return t


def _extremes(t: Tensor) -> tuple[float, float]:
    """(min, max) in one pass, no temporary (NaN propagates to both, inf shows in one)."""
    if t.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)


def _finite(t: Tensor) -> bool:
    lo, hi = _extremes(t)
    return math.isfinite(lo) and math.isfinite(hi)


def check_keys(sd: Mapping[str, object], expected: Iterable[str], source: str, extra_ok: bool = True) -> None:
    """Refuse a state missing an expected key (or, unless ``extra_ok``, holding an unexpected one)."""
    expected = list(expected)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise UserError(f"{source}: missing parameter {missing[0]!r} ({len(missing)} missing in all)")
    if not extra_ok:
        want = set(expected)
        extra = [k for k in sd if k not in want]
        if extra:
            raise UserError(f"{source}: unexpected parameter {extra[0]!r} ({len(extra)} unexpected in all)")


def check_state(sd: Mapping[str, Tensor], ref: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """θ_t (or a checkpoint state) against θ₀: keys, shapes, dtype, finite; on ``ref``'s device/dtype."""
    check_keys(sd, ref, source)
    out = {}
    for k, v in ref.items():
        t = check_tensor(sd[k], k, source, v.shape)
        out[k] = t.to(device=v.device, dtype=v.dtype)
    return out


def check_pretrained(module: torch.nn.Module, source: str) -> None:
    """The pre-trained tower: floating (half cast in place), finite, |w| <= MAX_ABS; integer refused."""
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            if "position_ids" in name or name.endswith("num_batches_tracked"):
                continue  # index buffers, not weights
            raise UserError(
                f"{source}: {name!r} has dtype {str(p.dtype).removeprefix('torch.')}; weights must be floating point"
            )
        lo, hi = _extremes(p)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UserError(f"{source}: {name!r} has non-finite values (NaN/inf)")
        if max(-lo, hi) > MAX_ABS:
            raise UserError(f"{source}: {name!r} has |w| > {MAX_ABS:g} (a corrupt or rescaled file)")


def check_head(head: Tensor, n_classes: int | None, dim: int | None, source: str) -> Tensor:
    """A head ``[C, D]`` or ``[C, D+1]``: rows = the task's class count, columns = the embedding."""
    if head.ndim != 2:
        raise UserError(f"{source}: head has shape {tuple(head.shape)}, expected 2-D [classes, dim]")
    if n_classes is not None and head.shape[0] != n_classes:
        raise UserError(f"{source}: head has {head.shape[0]} rows for {n_classes} classes")
    if dim is not None and head.shape[1] not in (dim, dim + 1):
        raise UserError(f"{source}: head has {head.shape[1]} columns, expected the embedding dim {dim}")
    return check_tensor(head, "head", source)


def check_logits(logits: Tensor, where: str) -> None:
    """An evaluation that meets non-finite logits stops (the NaN-loss code, exit 2)."""
    from otmf_exp.errors import NonFiniteLossError

    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLossError(f"non-finite logits {where}")


def check_file_state(sd: dict[str, Tensor], expected: Iterable[str], source: str) -> dict[str, Tensor]:
    """A raw state read from a file, before ``load_state_dict`` (which would round integers silently
    and give a traceback for a missing key): expected keys, floating dtype, finite."""
    check_keys(sd, expected, source)
    index = {k for k, v in sd.items() if not v.is_floating_point() and "position_ids" in k}
    return {k: v if k in index else check_tensor(v, k, source) for k, v in sd.items()}
