"""The taped forward in forward mode: the loss and the first probe's J v from one pass.

``batch_norm="unbiased"`` (with ``bn_estimator="probe"``) probes the parameters P used before
the last batch statistics with J v, the directional derivative of the loss vector along a
random v over P (``curvreg.batchnorm``). ``probe._rerun_tangents`` computes it with a second
forward in forward mode: another primal forward, and its backward, in every step.

Once a model's forward has been seen eligible (every function it calls on
``probe.FORWARD_AD_FUNCS``, and the losses reach P only through the model's output, which the
tape checks) for an input signature, the next forward with that signature runs in forward
mode itself: the tape draws the first probe before the forward, in the order the re-run would
draw it, and its op mode hands the ops dual parameters (p, v_p) for p in P. Dual tensors carry
their primal through the same kernels, so every value of the forward is unchanged; the tangent
of the model's output is kept, and J v = <d l_i / d o_i, o_dot_i> as after a re-run. Leaving
the forward-mode level (at the end of the model's call) clears every tangent, so the output
the user sees is an ordinary tensor.

After the forward the tape uses these tangents only if the parameters that got a tangent are
exactly this forward's P and the model ran once; otherwise (or if the forward called a function
outside the list, which then runs on primals) the step takes the re-run, with a fresh probe.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .probe import FORWARD_AD_FUNCS, KronProbe, draw, kron_conv, quiet_make_dual
from .rules.conv import CONV


def signature(model: nn.Module, args) -> tuple:
    """What a shared forward's plan is keyed by: the mode and the tensor inputs' layout."""
    return (model.training,) + tuple((tuple(t.shape), t.dtype, t.device)
                                     for t in tree_flatten(args)[0] if isinstance(t, Tensor))


class SharedForward:
    """One forward in forward mode, with tangents ``v`` on the parameters ``order``.

    Args:
        order: ids of the probed parameters, in the order the re-run draws their probes.
        params: the recording's ``{id: (name, parameter)}``.
        distribution, generator: the tape's probe options (``probe.draw``).
    """

    def __init__(self, order: List[int], params: Dict[int, tuple], distribution: str,
                 generator: Optional[torch.Generator]):
        self.order = list(order)
        self.params = params
        vs = {key: draw(params[key][1], distribution, generator) for key in self.order}
        self.vs = {key: v.dense() if isinstance(v, KronProbe) else v for key, v in vs.items()}
        self.kron = {key: v for key, v in vs.items() if isinstance(v, KronProbe)}
        self.duals: Dict[int, Tensor] = {}
        self.tangents: Optional[list] = None  # of the model's output tensors, after ``finish``
        self.valid = True
        self._level = False

    @property
    def active(self) -> bool:
        """Inside the model's forward (in forward mode)."""
        return self._level

    def enter(self) -> None:
        fwAD.enter_dual_level()
        self._level = True
        self.duals = {key: quiet_make_dual(self.params[key][1], v) for key, v in self.vs.items()}

    def finish(self, output) -> None:
        """Keep the tangents of ``output``'s floating-point tensors and leave forward mode."""
        if self._level:
            self.tangents = [fwAD.unpack_dual(t).tangent for t in tree_flatten(output)[0]
                             if isinstance(t, Tensor) and t.is_floating_point()]
        self.close()

    def close(self) -> None:
        if self._level:
            self._level = False
            fwAD.exit_dual_level()

    def get(self, t):
        """The dual of parameter ``t`` (itself if it has none)."""
        return self.duals.get(id(t), t) if isinstance(t, nn.Parameter) else t

    def conv(self, c) -> Optional[Tensor]:
        """A convolution (``ops.ConvCall``) whose weight is probed, written out: the primal, and
        the tangent conv(x, V) + conv(x_dot, W) (plus the bias's) summed in place, with
        conv(x, V) = a (x) conv(x, B) (one output channel per group) for a Kronecker probe
        a (x) B. PyTorch's forward mode computes the same sum out of place and convolves a
        zero tangent where x has none (the step's time is the same within noise; the tests
        compare this path with the re-run, which uses PyTorch's). None for a convolution whose
        weight is not probed. Call with torch functions disabled."""
        if not self.valid or id(c.weight) not in self.vs:
            return None
        x, x_dot = fwAD.unpack_dual(c.x)
        bias, b_dot = fwAD.unpack_dual(c.bias) if c.bias is not None else (None, None)
        if b_dot is None and c.bias is not None:  # a probed bias is passed as the parameter itself
            b_dot = self.vs.get(id(c.bias))
        conv = CONV[c.nd]

        def run(z, kernel):
            return conv(z, kernel, None, c.stride, c.padding, c.dilation, c.groups)

        y = conv(x, c.weight, bias, c.stride, c.padding, c.dilation, c.groups)
        probe = self.kron.get(id(c.weight))
        t = run(x, self.vs[id(c.weight)]) if probe is None else kron_conv(x, probe, c.groups, run)
        if x_dot is not None:  # in place: t is a fresh output that no backward saves
            t = t.add_(run(x_dot, c.weight))
        if b_dot is not None:
            t = t.add_(b_dot.view(1, -1, *[1] * c.nd))
        return fwAD.make_dual(y, t)

    def substitute(self, func, args, kwargs):
        """An op's arguments with the probed parameters replaced by their duals (one level
        into lists and tuples, as torch ops take them). A function without a vetted forward
        derivative ends the shared forward: it runs on primals, and the step takes the re-run."""
        if func not in FORWARD_AD_FUNCS:
            self.valid = False
            return tree_map(_primal, args), tree_map(_primal, kwargs)
        if not self.valid:
            return args, kwargs
        return tuple(self._sub(a) for a in args), {k: self._sub(a) for k, a in kwargs.items()}

    def _sub(self, a):
        if isinstance(a, nn.Parameter):
            return self.duals.get(id(a), a)
        if isinstance(a, (list, tuple)) and any(isinstance(b, nn.Parameter) for b in a):
            return type(a)(self.get(b) for b in a)
        return a


def _primal(t):
    return fwAD.unpack_dual(t).primal if isinstance(t, Tensor) else t
