"""Op-level recognition: which torch calls of a forward an exact rule covers, whatever module
(or no module) makes them.

``match(func, args, kwargs, params)`` looks at one call seen by the tape's TorchFunctionMode. When
the call is a parameter-consuming op with a rule (F.linear, F.conv1d/2d/3d, F.embedding
or ``p[idx]``, F.layer_norm, F.group_norm, F.rms_norm, F.instance_norm, F.batch_norm with running statistics,
an elementwise scale/shift ``x * p`` / ``x + p`` by a broadcast parameter, ``x @ W`` /
``torch.addmm`` with a parameter W, or ``p.expand(N, ...)`` of a class token) it returns an
``OpUse``: a *shell*, a parameter-less stand-in module of the layer type whose rule applies
(an ``nn.Linear`` holding the op's weight and bias, an ``nn.Conv2d`` with the op's stride and
padding, ...), the op's data input, and the names of the trainable parameters the op consumed.
The tape then treats the call like a call of that layer, so a subclass, a custom module built
from these ops, or a parent using a child's weight all get the exact rule.

Position-wise ops (linear, layer/RMS norm, embedding, elementwise scale/shift) also accept a
leading dimension that merges the examples with positions, example-major (``x.view(-1, d)`` of
``[N, T, d]``, window attention's ``[N * W, ...]``): the tape views it as ``[N, rest]``. Other
ops (convolutions, group and batch norms) accept one too, their rules run with each example's
rows as one group (``exact.merged_rows``: TNT's pixel embedding on [N * patches, C, H, W]).
Whether that reading is right is not assumed: the tape's independence check verifies it.

``NO_DOUBLE_BACKWARD`` lists ops whose derivative PyTorch cannot differentiate again, with the
replacement to use, so the tape can refuse them at the forward instead of autograd failing
inside ``backward()``.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import batchnorm

class OpUse(NamedTuple):
    """One op call an exact rule covers."""

    op: str                 # name for messages and ``tape.methods``, e.g. "F.linear"
    shell: nn.Module        # stand-in layer: its type selects the rule, its attributes the op's
    inputs: tuple           # the op's data input(s), as a module call's positional args
    names: Tuple[str, ...]  # trainable parameters consumed, as named on the shell
    position_wise: bool     # leading dim may merge examples with positions
    owners: Optional[dict] = None  # name -> Parameter, where the shell holds a view of it


def _shell(cls, params: Dict[str, Optional[Tensor]], **attrs) -> nn.Module:
    """An instance of layer type ``cls`` holding ``params`` and ``attrs``, without its __init__."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in params.items():
        if isinstance(v, nn.Parameter):
            m._parameters[k] = v
        else:
            object.__setattr__(m, k, v)
    for k, v in attrs.items():
        object.__setattr__(m, k, v)
    m.training = False
    return m


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def op_args(args, kwargs, parameters: bool):
    """The Parameters (``parameters=True``) or the plain tensors among an op's arguments, one
    level into lists/tuples, as torch ops take them."""
    def pick(a):
        return isinstance(a, Tensor) and isinstance(a, nn.Parameter) == parameters
    for a in (*args, *kwargs.values()):
        if pick(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if pick(b))


def _tracked(t, params) -> bool:
    return isinstance(t, nn.Parameter) and id(t) in params


def _names(candidates: Dict[str, object], params) -> Tuple[str, ...]:
    return tuple(k for k, v in candidates.items() if _tracked(v, params))


def _data(x, params) -> bool:
    """A data input: a tensor that is not itself a trainable parameter of the model."""
    return isinstance(x, Tensor) and not _tracked(x, params)


def linear_args(args, kwargs) -> tuple:
    """``(input, weight, bias)`` of an ``F.linear`` call, by position or keyword."""
    return _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")


def _linear(args, kwargs, params):
    x, w, b = linear_args(args, kwargs)
    names = _names({"weight": w, "bias": b}, params)
    if not names or not _data(x, params) or not isinstance(w, Tensor) or w.dim() != 2 or x.dim() < 1:
        return None
    shell = _shell(nn.Linear, {"weight": w, "bias": b}, in_features=w.shape[1], out_features=w.shape[0])
    return OpUse("F.linear", shell, (x,), names, True)


class TransposedLinear(nn.Module):
    """Shell for ``x @ W`` / ``torch.addmm(b, x, W)`` with a parameter W of shape [in, out]
    (GPT-2's Conv1D, hand-written ``x @ self.weight``): a Linear whose weight is stored
    transposed. Same ghost norms as ``nn.Linear``; per-example gradients are transposed."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape

    def forward(self, x):
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def _transposed(args, kwargs, params, x, w, b, op):
    names = _names({"weight": w, "bias": b}, params)
    if (not names or not _tracked(w, params) or not _data(x, params) or w.dim() != 2
            or not isinstance(x, Tensor) or x.dim() < 1):
        return None
    if b is not None and (not isinstance(b, Tensor) or b.shape != w.shape[1:]):
        return None
    return OpUse(op, TransposedLinear(w, b), (x,), names, True)


def _addmm(args, kwargs, params):
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) != 3:
        return None
    b, x, w = args
    return _transposed(args, kwargs, params, x, w, b, "torch.addmm")


def _matmul(args, kwargs, params):
    if len(args) != 2 or kwargs:
        return None
    x, w = args
    return _transposed(args, kwargs, params, x, w, None, "matmul")


def _ntuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # F.conv{nd}d -> nd


class ConvCall(NamedTuple):
    """The arguments of one ``F.conv{nd}d`` call, spatial ones as nd-tuples (``padding`` may
    be a string: ``'same'``, ``'valid'``)."""

    nd: int
    x: object
    weight: object
    bias: object
    stride: tuple
    padding: object
    dilation: tuple
    groups: int


def conv_call(nd: int, args, kwargs) -> ConvCall:
    """``F.conv{nd}d``'s arguments by position or keyword, with its defaults."""
    padding = _arg(args, kwargs, 4, "padding", 0)
    return ConvCall(nd, _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"),
                    _arg(args, kwargs, 2, "bias"), _ntuple(_arg(args, kwargs, 3, "stride", 1), nd),
                    padding if isinstance(padding, str) else _ntuple(padding, nd),
                    _ntuple(_arg(args, kwargs, 5, "dilation", 1), nd), _arg(args, kwargs, 6, "groups", 1))


def _conv(nd):
    def match(args, kwargs, params):
        c = conv_call(nd, args, kwargs)
        x, w, b = c.x, c.weight, c.bias
        names = _names({"weight": w, "bias": b}, params)
        if not names or not _data(x, params) or not isinstance(w, Tensor) or x.dim() != nd + 2:
            return None
        shell = _shell(_CONV_TYPES[nd], {"weight": w, "bias": b},
                       in_channels=w.shape[1] * c.groups, out_channels=w.shape[0],
                       kernel_size=tuple(w.shape[2:]), stride=c.stride, padding=c.padding,
                       dilation=c.dilation, groups=c.groups, padding_mode="zeros", transposed=False,
                       output_padding=(0,) * nd)
        return OpUse(f"F.conv{nd}d", shell, (x,), names, False)
    return match


def _embedding(args, kwargs, params):
    idx, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if not _tracked(w, params) or not isinstance(idx, Tensor) or idx.is_floating_point():
        return None
    pad = _arg(args, kwargs, 2, "padding_idx")
    if pad is not None and pad < 0:
        pad += w.shape[0]
    shell = _shell(nn.Embedding, {"weight": w}, num_embeddings=w.shape[0], embedding_dim=w.shape[1],
                   padding_idx=pad, scale_grad_by_freq=bool(_arg(args, kwargs, 5, "scale_grad_by_freq", False)),
                   max_norm=None, norm_type=2.0, sparse=False)
    return OpUse("F.embedding", shell, (idx,), ("weight",), True)


def _lookup(args, kwargs, params):
    """``p[idx]`` or ``torch.index_select(p, 0, idx)`` of a 2-D parameter with an integer index
    tensor (the relative position bias tables of Swin and BEiT): ``F.embedding(idx, p)``, the
    embedding rule's, with negative indices counted from the end as indexing does."""
    if not args or not _tracked(args[0], params) or args[0].dim() != 2 or kwargs:
        return None
    if len(args) == 2:  # p[idx]
        idx = args[1][0] if isinstance(args[1], tuple) and len(args[1]) == 1 else args[1]
    elif len(args) == 3 and args[1] in (0, -2):  # index_select(p, 0, idx)
        idx = args[2]
    else:
        return None
    if (not isinstance(idx, Tensor) or idx.is_floating_point() or idx.is_complex()
            or idx.dtype == torch.bool):
        return None
    w = args[0]
    idx = torch.where(idx < 0, idx + w.shape[0], idx)
    shell = _shell(nn.Embedding, {"weight": w}, num_embeddings=w.shape[0], embedding_dim=w.shape[1],
                   padding_idx=None, scale_grad_by_freq=False, max_norm=None, norm_type=2.0,
                   sparse=False)
    return OpUse("indexing", shell, (idx,), ("weight",), True)


def _layer_norm(args, kwargs, params):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    names = _names({"weight": w, "bias": b}, params)
    if not names or not _data(x, params):
        return None
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    shell = _shell(nn.LayerNorm, {"weight": w, "bias": b}, normalized_shape=shape,
                   eps=_arg(args, kwargs, 4, "eps", 1e-5), elementwise_affine=True)
    return OpUse("F.layer_norm", shell, (x,), names, True)  # per row: rows may merge positions


def _rms_norm(args, kwargs, params):
    x, shape, w = (_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape"),
                   _arg(args, kwargs, 2, "weight"))
    if not _tracked(w, params) or not _data(x, params):
        return None
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    shell = _shell(nn.RMSNorm, {"weight": w}, normalized_shape=shape,
                   eps=_arg(args, kwargs, 3, "eps"), elementwise_affine=True)
    return OpUse("F.rms_norm", shell, (x,), ("weight",), True)


def _group_norm(args, kwargs, params):
    x, groups = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "num_groups")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    names = _names({"weight": w, "bias": b}, params)
    if not names or not _data(x, params) or x.dim() < 2:
        return None
    shell = _shell(nn.GroupNorm, {"weight": w, "bias": b}, num_groups=groups,
                   num_channels=x.shape[1], eps=_arg(args, kwargs, 4, "eps", 1e-5), affine=True)
    return OpUse("F.group_norm", shell, (x,), names, False)


_BN_TYPES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_IN_TYPES = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}


class BatchStatistics(ValueError):
    """F.batch_norm normalizes a batch with its own statistics (examples mix)."""


def _stats_norm_args(args, kwargs, params, types):
    """(x, running_mean, running_var, weight, bias, names) of F.batch_norm / F.instance_norm,
    which share their leading arguments; None when no rule applies."""
    x, mean, var = (_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "running_mean"),
                    _arg(args, kwargs, 2, "running_var"))
    w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    names = _names({"weight": w, "bias": b}, params)
    if not names or not _data(x, params) or x.dim() not in types:
        return None
    return x, mean, var, w, b, names


def _batch_norm(args, kwargs, params):
    parsed = _stats_norm_args(args, kwargs, params, _BN_TYPES)
    if parsed is None:
        return None
    x, mean, var, w, b, names = parsed
    if _arg(args, kwargs, 5, "training", False) or mean is None or var is None:
        raise BatchStatistics("F.batch_norm")
    rows = x.dim() == 2  # [R, C]: an affine map per row, so rows may merge positions
    shell = _shell(_BN_TYPES[x.dim()], {"weight": w, "bias": b}, num_features=x.shape[1],
                   eps=_arg(args, kwargs, 7, "eps", 1e-5), affine=True, track_running_stats=True,
                   rows=rows)
    shell._buffers.update(running_mean=mean, running_var=var)
    return OpUse("F.batch_norm", shell, (x,), names, rows)


def _instance_norm(args, kwargs, params):
    parsed = _stats_norm_args(args, kwargs, params, _IN_TYPES)
    if parsed is None:
        return None
    x, mean, var, w, b, names = parsed
    stats = _arg(args, kwargs, 5, "use_input_stats", True)
    shell = _shell(_IN_TYPES[x.dim()], {"weight": w, "bias": b}, num_features=x.shape[1],
                   eps=_arg(args, kwargs, 7, "eps", 1e-5), affine=True,
                   track_running_stats=mean is not None)
    shell._buffers.update(running_mean=None if stats else mean, running_var=None if stats else var)
    return OpUse("F.instance_norm", shell, (x,), names, False)


class ElementwiseAffine(nn.Module):
    """Shell for ``x * p`` (``kind="mul"``) or ``x + p`` (``kind="add"``) with a parameter p
    broadcast against the data x over the example dimension: the layer-scale parameters of
    ConvNeXt/CaiT blocks, additive position embeddings, per-channel shifts.

    Example i's gradient is the broadcast reduction of delta_i * x_i (``mul``) or delta_i
    (``add``) to p's shape; both are materialized (p-sized per example).
    """

    def __init__(self, kind: str, param: Tensor, other_shape: torch.Size):
        super().__init__()
        self.kind, self.other_shape = kind, other_shape
        self.weight = param

    def forward(self, x):
        return x * self.weight if self.kind == "mul" else x + self.weight


class ParamFunction(nn.Module):
    """Shell for a tensor P computed from parameters and constants alone (no example dimension:
    Swin-V2's continuous position bias, an MLP on a fixed coordinate table; a clamped and
    exponentiated logit scale), where it meets the batch (``curvreg.unbatched``). It holds P's
    parameters (``p0``, ``p1``, ...) and P itself (``output``); example i's gradient is the
    vector-Jacobian product of P with d l_i / d P."""

    def __init__(self, output: Tensor, params: list):
        super().__init__()
        self.output = output
        for i, p in enumerate(params):
            self._parameters[f"p{i}"] = p

    def forward(self):
        return self.output


class NormalizedAffine(nn.Module):
    """Shell for the affine step ``xhat * w + b`` of a BatchNorm that normalizes with its batch
    statistics (``GradNormTape(batch_norm=...)``), its input ``xhat`` already normalized.
    ``w`` and ``b`` are per channel (dim 1); either may be None."""

    def __init__(self, weight: Optional[Tensor], bias: Optional[Tensor]):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, xhat):
        return batchnorm.affine(xhat, self.weight, self.bias)


_MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}


def _broadcast_ok(p: Tensor, x: Tensor) -> bool:
    """p broadcasts against x without covering x's leading (example) dim, and adds no dims."""
    if p.dim() > x.dim() or x.dim() == 0:
        return False
    if p.dim() == x.dim() and p.shape[0] != 1:
        return False
    try:
        return torch.broadcast_shapes(p.shape, x.shape) == x.shape
    except RuntimeError:
        return False


def _elementwise(kind):
    def match(args, kwargs, params, views=None):
        if len(args) != 2 or (kind == "add" and kwargs.get("alpha", 1) != 1) or (kwargs and kind == "mul"):
            return None
        a, b = args
        views = views or {}
        tracked = lambda t: _tracked(t, params) or (isinstance(t, Tensor) and id(t) in views)  # noqa: E731
        if tracked(a) and _data(b, params) and not tracked(b):
            p, x = a, b
        elif tracked(b) and _data(a, params) and not tracked(a):
            p, x = b, a
        else:
            return None
        if not _broadcast_ok(p, x) or not x.is_floating_point():
            return None
        shell = ElementwiseAffine(kind, p, x.shape)
        if id(p) in views:  # a reshaped view of a parameter: the rule reads the view's shape
            shell._parameters["weight"] = p
        return OpUse(f"elementwise {kind}", shell, (x,), ("weight",), True,
                     {"weight": views[id(p)]} if id(p) in views else None)
    return match


def _expand(args, kwargs, params):
    """``p.expand(N, ...)`` of a parameter with a leading dim of 1 (class and register tokens):
    a shift of nothing by p, so row i of the delta is example i's gradient."""
    if not args or not _tracked(args[0], params):
        return None
    p, sizes = args[0], args[1:] or (kwargs.get("size"),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    try:
        shape = p.expand(*sizes).shape
    except (RuntimeError, TypeError):
        return None
    padded = (1,) * (len(shape) - p.dim()) + tuple(p.shape)  # p [d] as [1, 1, d] of [N, 1, d]
    if p.dim() == 0 or len(padded) != len(shape) or padded[0] != 1 or shape[0] <= 1:
        return None
    return OpUse("expand", ElementwiseAffine("add", p, shape), (), ("weight",), False)


ADDCMUL = frozenset({torch.addcmul, Tensor.addcmul})
_ADDCMUL_ARGS = ("input", "tensor1", "tensor2", "value")


def addcmul_parts(args, kwargs, tracked):
    """For ``torch.addcmul(input, t1, t2, value=v)`` = input + v * t1 * t2 with a parameter (or a
    recorded view of one: ``tracked``) as the input or as one factor times data (ConvNeXt-V2's
    global response norm, ``addcmul(b, w, x * n)``), the same computation as a broadcast product
    and sum, which the elementwise rules take (run under the tape's op mode), else None. The
    rounding may differ from the fused kernel's in the last bit."""
    if len(args) + len(kwargs) > 4 or any(k not in _ADDCMUL_ARGS for k in kwargs):
        return None
    a, t1, t2, value = (_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "tensor1"),
                        _arg(args, kwargs, 2, "tensor2"), _arg(args, kwargs, 3, "value", 1))
    if not all(isinstance(t, Tensor) for t in (a, t1, t2)) or isinstance(value, Tensor):
        return None
    if tracked(t1) and tracked(t2):
        return None
    p, x = (t1, t2) if tracked(t1) else (t2, t1)
    if not tracked(p) and not tracked(a):
        return None
    return lambda: a + p * (x if value == 1 else x * value)


_ELEMENTWISE = _MUL | _ADD

MATCHERS = {
    F.linear: _linear,
    F.conv1d: _conv(1), F.conv2d: _conv(2), F.conv3d: _conv(3),
    F.embedding: _embedding,
    Tensor.__getitem__: _lookup, torch.index_select: _lookup, Tensor.index_select: _lookup,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
    Tensor.expand: _expand,
    torch.addmm: _addmm,
    torch.matmul: _matmul, Tensor.matmul: _matmul, Tensor.__matmul__: _matmul,
    F.instance_norm: _instance_norm,
    **{f: _elementwise("mul") for f in _MUL},
    **{f: _elementwise("add") for f in _ADD},
}


# x @ W.T with a parameter W [out, in] is F.linear(x, W): the tape runs it as that
# (``derived.DerivedUses.as_linear``), so the Linear rule and the fused path take it
MATMULS = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__})


def transposes(func, args) -> bool:
    """Whether this call transposes a 2-D tensor (``W.T``, ``W.t()``, ``W.mT``,
    ``W.transpose(0, 1)``)."""
    if not args or not isinstance(args[0], Tensor) or args[0].dim() != 2:
        return False
    if func in (Tensor.t, torch.t, Tensor.T.__get__, Tensor.mT.__get__):
        return len(args) == 1
    if func in (Tensor.transpose, torch.transpose) and len(args) == 3:
        return {d % 2 for d in args[1:] if isinstance(d, int)} == {0, 1}
    return False


# order-preserving reshapes: a parameter's view through one of these is the parameter itself,
# reshaped, for the elementwise rules (timm ConvNeXt's ``x * gamma.reshape(1, -1, 1, 1)``)
VIEWS = frozenset({Tensor.reshape, torch.reshape, Tensor.view, Tensor.view_as, Tensor.reshape_as,
                   Tensor.unsqueeze, torch.unsqueeze, Tensor.squeeze, torch.squeeze,
                   Tensor.flatten, torch.flatten})


# dtype and device casts: the result's gradient is the input's
CASTS = frozenset({Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.to,
                   Tensor.type_as})
# shifts by a number (``p + 1``, ``1 + p``, ``p - 1``): the same
_SHIFTS = frozenset({torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, torch.sub,
                     Tensor.sub, Tensor.__sub__})


def passes_gradient(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` of a tensor p (``args[0]``) is p itself for the
    elementwise rules: an order-preserving reshape (``VIEWS``), a cast, or a shift by a number
    (Gemma's ``x * (1 + weight.float())``); its gradient is the result's, reshaped."""
    if func in VIEWS or func in CASTS:
        return True
    return (func in _SHIFTS and len(args) == 2 and not kwargs
            and isinstance(args[1], (int, float)) and not isinstance(args[1], bool))


def match(func, args, kwargs, params, views=None) -> Optional[OpUse]:
    """The ``OpUse`` for this call, or None when no op rule covers it. ``views``: id of a
    recorded reshaped view -> its Parameter (used by the elementwise rules)."""
    m = MATCHERS.get(func)
    if m is None:
        return None
    if views and func in _ELEMENTWISE:
        return m(args, kwargs or {}, params, views)
    return m(args, kwargs or {}, params)


# op -> what to use instead. PyTorch has no derivative for these ops' backward, so a penalty
# on per-example gradients through them cannot be differentiated.
NO_DOUBLE_BACKWARD = {
    F.hardsigmoid: ("F.hardsigmoid / nn.Hardsigmoid",
                    "a piecewise-linear module written with clamp, e.g. (x + 3).clamp(0, 6) / 6"),
    F.embedding_bag: ("F.embedding_bag / nn.EmbeddingBag",
                      "nn.Embedding followed by a sum or mean over the bag"),
    torch.cdist: ("torch.cdist",
                  "an explicit distance, e.g. (a.unsqueeze(-2) - b.unsqueeze(-3)).norm(dim=-1)"),
}
