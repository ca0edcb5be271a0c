"""BatchNorm with batch statistics inside the tape: ``GradNormTape(batch_norm=...)``.

In training mode a BatchNorm normalizes with the statistics s = (mean, var) of the batch, so
l_i depends on the other examples, but only through s. The per-example gradient
g_i = d l_i / d theta (statistics included, what autograd gives for l_i alone) is well defined;
it is not separable per example. Write l_i = F_i(theta, s(theta)), with F_i the same network
whose BatchNorms take s as an input. Then

    u_i = dF_i / dtheta (s held constant)      is separable: the rules compute ||u_i||^2 exactly,
    g_i . v = u_i . v + sum_b <dF_i/ds_b, s_b'>  for any direction v, with s_b' = (d s_b / d theta) v
                                                 the total tangent of BatchNorm b's statistics.

``"frozen"`` returns ||u_i||^2 (exact, deterministic): the squared gradient norm of the model
whose statistics are those of this batch, held constant. It is a different quantity from
||g_i||^2, not an approximation that improves with the batch size.

``"unbiased"`` returns an unbiased estimate of ||g_i||^2. Let P be the parameters used before
the last BatchNorm's statistics (a superset of those the statistics depend on); elsewhere
g_i = u_i exactly. With K probes v_k over P, E[v v^T] = I, and g_i . v = u_i . v + d_i:

  * ``bn_estimator="probe"`` (default): ||u_i||^2 over the parameters outside P, exactly, plus
    (1/K) sum_k (g_i . v_k)^2 over P;
  * ``bn_estimator="control_variate"``: ||u_i||^2 over all parameters, exactly, plus
    (1/K) sum_k [(g_i . v_k)^2 - (u_i . v_k)^2] = (1/K) sum_k d_i (2 u_i . v_k + d_i).

The control variate only pays when u_i is close to g_i. Measured at initialization
(``benchmarks/bench_batchnorm.py``) the frozen norms were 2-3 times the true ones and the control
variate had *more* noise than probing, while "probe" had 3-5 times less than probing every
parameter (the classifier's exact norms carry most of the value); hence the default.

How:
  * the normalization is one autograd function (``_Normalize``: PyTorch's batch_norm kernel,
    which also moves the running statistics) whose backward is the true one normally and
    that of the statistics held constant during the tape's delta pass (in reduced precision
    the same through elementary ops and ``_Gate``s), so the one forward carries both graphs:
    the true one (the training loss's gradient, g_i . v) and the frozen one (the deltas
    dF_i/dy, hence u_i);
  * g_i . v for all i at once is J v, J the Jacobian of the loss vector. Where the forward's
    functions allow forward mode (``probe.FORWARD_AD_FUNCS``), J v = <d l_i / d o_i, o_dot_i>
    with o_dot the output's tangent: from the taped forward itself, run in forward mode from the
    second forward with the same input signature on (``curvreg.shared_forward``; first probe),
    or from a forward-mode re-run (``probe._rerun_tangents``; the first step, further probes).
    Elsewhere by the double-backward trick: a = J^T w for a dummy w (one backward, graph kept),
    then J v = d <a, v> / dw. Every step keeps its graph, so the estimate is differentiable
    and its gradient is an unbiased estimate of grad mean_i ||g_i||^2.

The running statistics are updated by PyTorch's own kernel, once per taped forward, exactly as a
plain forward updates them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

MODES = ("frozen", "unbiased")
ESTIMATORS = ("probe", "control_variate")  # how "unbiased" covers the statistics' reach


class Switch:
    """Whether the statistics' gradient is cut (True inside the tape's delta pass)."""

    __slots__ = ("frozen",)

    def __init__(self):
        self.frozen = False


class _Gate(torch.autograd.Function):
    """Identity; its backward passes the gradient unless ``switch.frozen`` is set."""

    @staticmethod
    def forward(ctx, t, switch):
        ctx.switch = switch
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None if ctx.switch.frozen else grad), None

    @staticmethod
    def jvp(ctx, t_dot, _switch):  # forward mode (curvreg.shared_forward): the true tangent
        return t_dot.clone()


class _Normalize(torch.autograd.Function):
    """(xhat, rstd) of a batch-statistics normalization from PyTorch's fused kernel, which also
    moves the running statistics (when given) exactly as the plain call does.

    The backward is the true one (the statistics' coupling included, with the gradient reaching
    ``rstd`` from the shared forward's tangent), except inside the tape's delta pass
    (``switch.frozen``), where the statistics are held constant: grad * rstd, with ``rstd`` this
    function's own saved output, so the training backward differentiates through it. Out of place
    and from differentiable ops when a graph is built, so every order stays differentiable; the
    elementary-op form it replaces (``_normalize_ops``) took about four passes over [N, C, ...]
    in the forward and eight in the backward, and a second batch_norm call for the update."""

    @staticmethod
    def forward(ctx, x, switch, running_mean, running_var, momentum, eps):
        xhat, _, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True,
                                                  momentum, eps)
        rstd = _channel(invstd.to(x.dtype), x)
        ctx.save_for_backward(xhat, rstd)
        ctx.switch, ctx.dims = switch, [0] + list(range(2, x.dim()))
        ctx.count = x.numel() // x.shape[1]
        ctx.set_materialize_grads(False)
        return xhat, rstd

    @staticmethod
    def backward(ctx, grad, grad_rstd):
        xhat, rstd = ctx.saved_tensors
        if ctx.switch.frozen:  # the statistics held constant
            return (None if grad is None else grad * rstd), None, None, None, None, None
        if grad is None and grad_rstd is None:
            return None, None, None, None, None, None
        # d rstd / dx = -rstd^2 xhat / count
        extra = None if grad_rstd is None else grad_rstd * rstd / ctx.count
        if torch.is_grad_enabled():  # differentiable ops
            dims = ctx.dims
            coef = extra if grad is None else (grad * xhat).mean(dims, keepdim=True)
            if grad is not None and extra is not None:
                coef = coef + extra
            inner = -xhat * coef if grad is None else grad - grad.mean(dims, keepdim=True) - xhat * coef
            return inner * rstd, None, None, None, None, None
        if grad is None:
            out = xhat * (extra * rstd).neg_()
        else:  # rstd (grad - mean(grad) - xhat mean(grad xhat)) fused, then grad_rstd's part
            out = _centered(grad, xhat, rstd, (True, False, False))[0]
            if extra is not None:
                out.addcmul_(xhat, extra * rstd, value=-1)
        return out, None, None, None, None, None


class _AffineTangent(torch.autograd.Function):
    """The tangent of y = xhat * w + b in a shared forward: with s = w * rstd,

        y_dot = s (t - mean(t) - xhat mean(t xhat)) + xhat v_w + v_b
              = s t + xhat (v_w - s mean(t xhat)) + (v_b - s mean(t)),

    t the input's tangent, v_w and v_b the probes of w and b (None where not probed; w None
    means no weight). The centering and its reductions run in PyTorch's fused batch-norm
    backward kernel (``_centered``): one kernel and up to two in-place passes over [N, C, ...]
    forward, two kernels and one product in the hand-written backward, where elementary ops
    would allocate a fresh full-size temporary at each step (page faults on every step on
    CPU). First order: nothing differentiates the training backward through it again
    (the re-run, ``probe._rerun_tangents``, keeps forward mode through elementary ops, so the
    tests compare two independent computations)."""

    @staticmethod
    def forward(ctx, t, xhat, rstd, weight, v_w, v_b):
        s = rstd if weight is None else weight * rstd
        count = t.numel() // t.shape[1]
        out, sum_tx, sum_t = _centered(t, xhat, s, (True, True, True))
        c, m = _channel(sum_tx, xhat) / count, _channel(sum_t, xhat) / count
        slope = -s * c if v_w is None else v_w - s * c
        if v_w is not None:
            out.addcmul_(xhat, v_w)
        if v_b is not None:
            out.add_(v_b)
        ctx.save_for_backward(t, xhat, rstd, weight, s, c, m, slope)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        t, xhat, rstd, weight, s, c, m, slope = ctx.saved_tensors
        grad_t, sum_gx, sum_g = _centered(grad, xhat, s, (True, True, True))
        sum_gx, sum_g = _channel(sum_gx, xhat), _channel(sum_g, xhat)
        count = grad.numel() // grad.shape[1]
        grad_xhat = grad * slope
        grad_xhat.addcmul_(t, s * sum_gx, value=-1 / count)
        sum_gt = _channel(_centered(grad, t, None, (False, True, False))[1], xhat)
        grad_s = sum_gt - m * sum_g - c * sum_gx
        grad_rstd = grad_s if weight is None else grad_s * weight
        grad_w = None if weight is None else grad_s * rstd
        needs = ctx.needs_input_grad
        return (grad_t, grad_xhat, grad_rstd, grad_w, sum_gx if needs[4] else None,
                sum_g if needs[5] else None)


# A defect of PyTorch's CPU batch-norm backward (torch 2.14): for a batch of ONE example, an
# output gradient laid out channels-last (what ``x.flatten(2).transpose(1, 2)`` downstream hands
# back, as in XCiT's convolutional patch embedding) gives wrong input, weight and bias gradients
# when the input is contiguous, in eval and training mode; through F.instance_norm (which runs
# the kernel on one [1, N*C, ...] batch) whatever the input's layout. Batches of two or more are
# right, and so is every case with a contiguous gradient. It would hit every batch-of-one
# computation: the per-example loop fallback, the brute-force loop reference, a tape on one
# example. The guard below hands the kernel a contiguous gradient (tests/test_one_example_layout.py).
_NORM_KERNELS = frozenset({F.batch_norm, F.instance_norm})


def _contiguous(grad: Tensor) -> Tensor:
    return grad.contiguous()


def one_example_layout(func, args, kwargs, out):
    """``out`` of an F.batch_norm / F.instance_norm call; for a batch of one, with a gradient
    hook that makes the kernel's output gradient contiguous (see above). A relayout,
    differentiable: no value or derivative changes."""
    if func not in _NORM_KERNELS or not isinstance(out, Tensor) or not out.requires_grad:
        return out
    x = _arg(args, kwargs, 0, "input")
    if isinstance(x, Tensor) and x.dim() > 2 and x.shape[0] == 1:
        out.register_hook(_contiguous)
    return out


class OneExampleLayout(TorchFunctionMode):
    """While active, every F.batch_norm / F.instance_norm call gets ``one_example_layout``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return one_example_layout(func, args, kwargs, func(*args, **kwargs))


def _centered(grad: Tensor, x: Tensor, weight: Optional[Tensor], mask):
    """PyTorch's fused batch-norm backward with ``x`` taken as already normalized (mean 0,
    rstd 1): weight * (grad - mean(grad) - x mean(grad x)), sum(grad x) and sum(grad) per
    channel (``mask`` picks which), in one pass over [N, C, ...] and without the full-size
    temporaries of the same computed by elementary ops. ``weight`` is per channel, any shape."""
    channels = x.shape[1]
    zero, one = x.new_zeros(channels), x.new_ones(channels)
    if x.shape[0] == 1:  # see one_example_layout
        grad = grad.contiguous()
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, None if weight is None else weight.reshape(channels), None, None, zero, one,
        True, 0.0, list(mask))


def _channel(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector [C] as [1, C, 1, ...] for broadcasting against ``like``."""
    return v.view([1, -1] + [1] * (like.dim() - 2))


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def uses_batch_stats(args, kwargs) -> bool:
    """Whether this F.batch_norm call normalizes with the statistics of its batch."""
    return bool(_arg(args, kwargs, 5, "training", False)) or _arg(args, kwargs, 1, "running_mean") is None


def explicit(args, kwargs, update: bool = False) -> Tensor:
    """F.batch_norm's value written with elementary ops: for forward mode (``curvreg.probe``'s
    re-runs, ``curvreg.shared_forward``), where PyTorch's backward through the batch_norm
    kernel's forward-mode derivative is wrong for the parameters before it (measured: 20-100%
    off on a Conv-BN-ReLU net against double backprop through the same ops). The running
    statistics are left alone, or with ``update`` moved as by the plain call (``_update``)."""
    x = _arg(args, kwargs, 0, "input")
    rm, rv = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    if update:
        _update(args, kwargs)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if uses_batch_stats(args, kwargs):
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
    else:
        mean, var = rm.reshape(shape), rv.reshape(shape)
    out = (x - mean) * (var + eps).rsqrt()
    if w is not None:
        out = out * w.reshape(shape)
    return out if b is None else out + b.reshape(shape)


def _update(args, kwargs) -> None:
    """The running-statistics update of an F.batch_norm call (when given and training), with
    PyTorch's kernel on the detached input (no tangent either), as the plain call makes it."""
    rm, rv = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    if rm is not None and bool(_arg(args, kwargs, 5, "training", False)):
        with torch.no_grad():
            F.batch_norm(_arg(args, kwargs, 0, "input").detach(), rm, rv, None, None, True,
                         _arg(args, kwargs, 6, "momentum", 0.1), _arg(args, kwargs, 7, "eps", 1e-5))


def normalize(args, kwargs, switch: Switch):
    """(xhat, weight, bias) for an F.batch_norm call with batch statistics.

    Updates the running statistics (when given and training) with PyTorch's kernel, as the
    plain call would. Call with torch functions disabled (inside the tape's mode)."""
    x = _arg(args, kwargs, 0, "input")
    w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    if x.dim() < 2:
        raise ValueError(f"F.batch_norm needs an input of shape [N, C, ...], got {tuple(x.shape)}")
    dims = [0] + list(range(2, x.dim()))
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"BatchNorm with batch statistics needs more than one value per channel, "
                         f"got input of shape {tuple(x.shape)}")
    x, t = fwAD.unpack_dual(x)  # a shared forward's input carries a tangent
    if x.dtype in (torch.float32, torch.float64):
        training = bool(_arg(args, kwargs, 5, "training", False))
        rm, rv = (_arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")) \
            if training else (None, None)
        xhat, rstd = _Normalize.apply(x, switch, rm, rv, _arg(args, kwargs, 6, "momentum", 0.1), eps)
    else:  # reduced precision: in the input's dtype, as before
        _update(args, kwargs)
        xhat, rstd = _normalize_ops(x, dims, eps, switch)
    return Normalized(xhat, rstd, t), w, b


class Normalized(NamedTuple):
    """A batch-statistics normalization: xhat, rstd ([1, C, 1, ...]), the input's tangent in a
    shared forward (else None)."""
    xhat: Tensor
    rstd: Tensor
    tangent: Optional[Tensor]


def shared_affine(n: Normalized, weight, bias, weight_dual, bias_dual) -> Tensor:
    """The affine step y = xhat * w + b of a shared forward, as a dual: its primal from the
    primals, its tangent (the statistics' coupling and the probes of w and b included) from
    ``_AffineTangent`` in one pass where forward mode through the normalization and the
    affine ops makes about nine."""
    y = affine(n.xhat, weight, bias)
    v_w = fwAD.unpack_dual(weight_dual).tangent if weight_dual is not None else None
    v_b = fwAD.unpack_dual(bias_dual).tangent if bias_dual is not None else None
    per_channel = [None if v is None else _channel(v, n.xhat) for v in (weight, v_w, v_b)]
    tangent = _AffineTangent.apply(n.tangent, n.xhat, n.rstd, *per_channel)
    return fwAD.make_dual(y, tangent)


def affine(xhat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """xhat * w + b with w and b per channel (dim 1); either may be None."""
    if weight is not None and bias is not None:
        return torch.addcmul(_channel(bias, xhat), xhat, _channel(weight, xhat))
    y = xhat if weight is None else xhat * _channel(weight, xhat)
    return y if bias is None else y + _channel(bias, xhat)


def _normalize_ops(x: Tensor, dims, eps: float, switch: Switch):
    """(xhat, rstd) from elementary ops, the statistics through gates (``_Normalize``'s
    semantics, in any floating dtype)."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)  # = x.var(unbiased=False), 4x faster on CPU
    rstd = (_Gate.apply(var, switch) + eps).rsqrt()
    return (x - _Gate.apply(mean, switch)) * rstd, rstd
