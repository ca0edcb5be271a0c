"""Tensors made from parameters whose use is decided where they are consumed.

- ``W.T`` of a parameter W [out, in] (also ``W.t()``, ``W.mT``, ``W.transpose(0, 1)``): a matmul
  with it, ``x @ W.T`` in any spelling, runs as ``F.linear(x, W)`` (``as_linear``), so the linear
  rule and the fused path take it (Falcon's ``FalconLinear``).
- ``torch.cat`` of 1-D parameters and constants (the q, k and v biases of timm's BEiT and EVA,
  the key's a zero buffer): a linear layer's bias or a sum of it with data runs as one sum per
  piece, ``x[..., a:b] + piece``, joined again (``joined``); each piece that is a parameter is an
  elementwise rule op. The values are the same.

Any other use of such a tensor is an ordinary use of its parameters (``other_uses``). A tensor
used both ways is refused: the per-example gradients of the two uses cannot be separated.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

# the ops at which a joined tensor added to data is taken piece by piece (``joined``)
SUMS = frozenset({torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__})
_CATS = frozenset({torch.cat, torch.concat, torch.concatenate})


class Derived:
    """One recorded tensor made from parameters: a transpose (``pieces`` None) or a join."""

    __slots__ = ("tensor", "params", "pieces", "consumed", "other")

    def __init__(self, tensor: Tensor, params: List[nn.Parameter], pieces: Optional[list]):
        self.tensor, self.params, self.pieces = tensor, params, pieces
        self.consumed = self.other = False  # by its rewrite; by another op


class DerivedUses:
    """The derived tensors of one taped forward, keyed by ``id`` (each entry holds its tensor,
    which lookups check, so a reused id never matches). ``params``: id -> (name, Parameter) of
    the model's trainable parameters."""

    def __init__(self, params: Dict[int, tuple]):
        self.params = params
        self.entries: Dict[int, Derived] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def record(self, func, args, kwargs, used: list, out) -> bool:
        """Record ``out`` if it is a transpose of the one parameter in ``used`` or a join of 1-D
        parameters and constants; whether it was."""
        if not isinstance(out, Tensor):
            return False
        if len(used) == 1 and ops.transposes(func, args) and args[0] is used[0]:
            self.entries[id(out)] = Derived(out, used, None)
            return True
        pieces = _join_pieces(func, args, kwargs)
        if pieces is None or not used:
            return False
        tracked = [p for p in pieces if id(p) in self.params]
        if any(p.requires_grad for p in pieces if id(p) not in self.params) or len(tracked) != len(used):
            return False  # a piece that is neither a parameter nor a constant
        self.entries[id(out)] = Derived(out, tracked, pieces)
        return True

    def _get(self, t) -> Optional[Derived]:
        entry = self.entries.get(id(t)) if isinstance(t, Tensor) else None
        return entry if entry is not None and entry.tensor is t else None

    def as_linear(self, args, kwargs) -> Optional[tuple]:
        """``(x, W)`` for ``x @ W.T`` with ``W.T`` a recorded transpose, else None."""
        if kwargs or len(args) != 2 or not isinstance(args[0], Tensor) or args[0].dim() < 1:
            return None
        entry = self._get(args[1])
        if entry is None or entry.pieces is not None:
            return None
        self._consume(entry)
        return args[0], entry.params[0]

    def joined(self, func, args, kwargs) -> Optional[Callable[[], Tensor]]:
        """For ``F.linear(x, W, b)`` or ``x + b`` with b a recorded join as long as x's last
        dim, the same computation piece by piece (to run under the tape's op mode), else None."""
        if func is F.linear:
            x, w, b = ops.linear_args(args, kwargs)
            entry = self._get(b)
            if entry is None or entry.pieces is None or not isinstance(x, Tensor):
                return None
            self._consume(entry)
            return lambda: _add_pieces(F.linear(x, w), entry.pieces)
        if func not in SUMS or len(args) != 2 or kwargs:
            return None
        for x, b in (args, args[::-1]):
            entry = self._get(b)
            if (entry is not None and entry.pieces is not None and isinstance(x, Tensor)
                    and self._get(x) is None and x.dim() >= 1 and x.shape[-1] == b.shape[0]):
                self._consume(entry)
                return lambda: _add_pieces(x, entry.pieces)
        return None

    def other_uses(self, args, kwargs) -> List[nn.Parameter]:
        """The parameters of the derived tensors an op (not their rewrite) takes."""
        found = []
        for t in ops.op_args(args, kwargs, parameters=False):
            entry = self._get(t)
            if entry is not None:
                entry.other = True
                self._check(entry)
                found += entry.params
        return found

    def _consume(self, entry: Derived) -> None:
        entry.consumed = True
        self._check(entry)

    def _check(self, entry: Derived) -> None:
        if not (entry.consumed and entry.other):
            return
        names = ", ".join(f"'{self.params[id(p)][0]}'" for p in entry.params)
        if entry.pieces is None:
            raise ValueError(
                f"parameter {names} is used through its transpose both in a matmul (taken as "
                "F.linear) and in another op; per-example gradients of the two uses cannot be "
                "separated. Transpose it separately for each use.")
        raise ValueError(
            f"parameters {names} are joined by torch.cat into one tensor used both as a bias "
            "(taken piece by piece) and in another op; per-example gradients of the two uses "
            "cannot be separated. Join them separately for each use.")


def _join_pieces(func, args, kwargs) -> Optional[list]:
    """The 1-D tensors ``torch.cat`` joins along their only dim, else None."""
    if func not in _CATS or not args or not isinstance(args[0], (list, tuple)):
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    pieces = list(args[0])
    if (dim not in (0, -1) or len(pieces) < 2
            or not all(isinstance(p, Tensor) and p.dim() == 1 for p in pieces)):
        return None
    return pieces


def _add_pieces(x: Tensor, pieces: list) -> Tensor:
    """``x + torch.cat(pieces)`` as ``torch.cat([x[..., a:b] + piece, ...], -1)``."""
    parts, start = [], 0
    for p in pieces:
        parts.append(x[..., start:start + p.shape[0]] + p)
        start += p.shape[0]
    return torch.cat(parts, -1)
