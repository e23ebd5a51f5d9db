"""An explicit ``nn.MultiheadAttention`` forward whose q/k/v/out projections are visible to callers.

PyTorch's own forward (``F.multi_head_attention_forward`` or the fused fast path) reads the fused
``in_proj_weight`` and ``out_proj.weight`` directly, so per-projection additions (MINGLE's experts,
``merging/lora_moe.py``) and forward hooks on ``out_proj`` cannot act on it. :func:`mha_forward`
computes the same attention with ``F.scaled_dot_product_attention``, adds ``deltas[p](x_p)`` to
projection ``p`` in ``"q" "k" "v"``, and calls ``out_proj`` as a module. It reads the module's
attributes at call time, so it works under ``torch.func.functional_call``. Supported: packed
in-projection (``_qkv_same_embed_dim``), no ``bias_k``/``bias_v``/``add_zero_attn``,
``need_weights=False`` (open_clip's call; returns ``(out, None)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A MultiheadAttention mask (bool: True = masked out; float: added) as a float additive mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_forward(
    mha: nn.MultiheadAttention,
    deltas: Mapping[str, Callable[[Tensor], Tensor]],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    """``mha(query, key, value, ...)`` with ``deltas`` added to the q/k/v projections (see module doc)."""
    if need_weights:
        raise ValueError("mha_forward computes no attention weights; call with need_weights=False")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("mha_forward supports a packed in-projection without bias_k/bias_v/add_zero_attn")
    if not mha.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    e, heads = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias

    def proj(i: int, x: Tensor, p: str) -> Tensor:
        y = F.linear(x, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
        return y + deltas[p](x) if p in deltas else y

    q, k, v = proj(0, query, "q"), proj(1, key, "k"), proj(2, value, "v")
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (x.view(n, x.shape[1], heads, e // heads).transpose(1, 2) for x in (q, k, v))
    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(n, heads, lq, lk) if mask.dim() == 3 else mask
    pad = _additive(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(n, 1, 1, lk)
        mask = pad if mask is None else mask + pad
    o = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=mha.dropout if mha.training else 0.0,
        is_causal=is_causal and mask is None,
    )
    out = mha.out_proj(o.transpose(1, 2).reshape(n, lq, e))
    return (out if mha.batch_first else out.transpose(0, 1)), None
