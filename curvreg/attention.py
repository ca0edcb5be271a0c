"""``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) written with the ops
the tape has rules for, so that attention modules need no per-example loop.

PyTorch's function is one opaque call to the tape: its projections happen inside it. For the
common case, self-attention with the packed input projection, this computes the same function
batch-first with ``F.linear`` (the input and output projections: Linear rules on sequences) and
``F.scaled_dot_product_attention`` (no parameters), and returns what PyTorch returns: the output
``[L, N, E]`` and the attention weights (averaged over heads unless asked otherwise) or None.
Anything else (cross-attention, separate projection weights, ``bias_k``/``bias_v``,
``add_zero_attn``, static keys, unbatched or 3-D masks) goes to PyTorch's own function.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_NAMES = list(inspect.signature(F.multi_head_attention_forward).parameters)


def _float_mask(mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    """A boolean mask (True = masked) as 0 / -inf in ``dtype``; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def decompose(args, kwargs) -> Optional[Callable[[], tuple]]:
    """A thunk computing the call with rule ops, or None where PyTorch's function must run."""
    a = dict(zip(_NAMES, args), **kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    kpm, mask = a.get("key_padding_mask"), a.get("attn_mask")
    if (not (q is k is v) or q.dim() != 3 or a.get("use_separate_proj_weight")
            or a.get("bias_k") is not None or a.get("bias_v") is not None or a.get("add_zero_attn")
            or a.get("static_k") is not None or a.get("static_v") is not None
            or (mask is not None and mask.dim() != 2) or (kpm is not None and kpm.dim() != 2)):
        return None
    if a.get("is_causal") and mask is None:
        return None  # PyTorch raises for this; let it say so
    return lambda: _self_attention(a)


def _self_attention(a: dict) -> tuple:
    x, heads = a["query"], a["num_heads"]
    length, n, e = x.shape
    d = e // heads
    need_weights = a.get("need_weights", True)
    p = a["dropout_p"] if a.get("training", True) else 0.0
    qkv = F.linear(x.transpose(0, 1), a["in_proj_weight"], a["in_proj_bias"])  # [N, L, 3E]
    q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = _float_mask(a.get("attn_mask"), x.dtype)
    kpm = _float_mask(a.get("key_padding_mask"), x.dtype)
    causal = bool(a.get("is_causal")) and kpm is None and not need_weights
    if causal:
        mask = None  # the mask is the causal one; sdpa applies it
    if kpm is not None:
        kpm = kpm.reshape(n, 1, 1, length)
        mask = kpm if mask is None else mask + kpm
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p > 0:
            weights = F.dropout(weights, p=p)
        out = torch.matmul(weights, v)
    else:
        weights = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    out = F.linear(out.transpose(1, 2).reshape(n, length, e), a["out_proj_weight"], a["out_proj_bias"])
    if weights is not None and a.get("average_attn_weights", True):
        weights = weights.mean(dim=1)
    return out.transpose(0, 1), weights
