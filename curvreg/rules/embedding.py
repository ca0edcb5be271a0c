"""Rule for ``nn.Embedding`` with index input ``[N, *]``.

Row v of example i's gradient is g_i[v] = sum_{t : idx_t = v, v != padding_idx} delta_{i,t}, so
repeated tokens add up before squaring:
    ||g_i||^2 = sum_{t,s} [idx_t = idx_s] <delta_t, delta_s>             (Gram form, ~ T^2 d)
The materialized form scatters into ``[V, d]`` per example (~ V d); the cheaper one is used.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from ._base import LayerRule, fold_groups


def _positions(layer: nn.Embedding, inputs: Sequence, grad_output: Tensor, group: int):
    if layer.scale_grad_by_freq:
        raise ValueError("Embedding with scale_grad_by_freq=True scales each gradient by token "
                         "counts over the whole batch, which mixes examples; set it to False.")
    idx = inputs[0]
    idx = fold_groups(idx.reshape(idx.shape[0], -1), group)  # [G, T]
    d = fold_groups(grad_output.reshape(grad_output.shape[0], -1, layer.embedding_dim), group)
    if layer.padding_idx is not None:
        d = d * (idx != layer.padding_idx).unsqueeze(-1).to(d.dtype)
    return idx, d  # [G, T], [G, T, d]


def embedding_grads(layer: nn.Embedding, inputs: Sequence, grad_output: Tensor,
                    names: Sequence[str], group: int) -> Dict[str, Tensor]:
    idx, d = _positions(layer, inputs, grad_output, group)
    out = d.new_zeros(idx.shape[0], layer.num_embeddings, layer.embedding_dim)
    return {"weight": out.scatter_add(1, idx.unsqueeze(-1).expand_as(d), d)}


def embedding_sq_norms(layer: nn.Embedding, inputs: Sequence, grad_output: Tensor,
                       names: Sequence[str], group: int) -> Tensor:
    idx, d = _positions(layer, inputs, grad_output, group)
    positions = idx.shape[1]
    if positions * positions > layer.num_embeddings:
        return embedding_grads(layer, inputs, grad_output, names, group)["weight"].pow(2).sum((1, 2))
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)  # [G, T, T]
    return (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2))


EMBEDDING_RULE = LayerRule(grads=embedding_grads, sq_norms=embedding_sq_norms)
