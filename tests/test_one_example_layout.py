"""PyTorch's CPU batch-norm backward is wrong for a batch of one whose output gradient is laid
out channels-last while the input is not (torch 2.14; ``curvreg.batchnorm.one_example_layout``).
Every batch-of-one path in the library guards against it: the kernels themselves against the
formula written out, and the loop reference, the per-example loop fallback and a tape on one
example against torch.func's vmap and the batched tape, in float64."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg
from curvreg.batchnorm import OneExampleLayout
from curvreg.reference import loop_sq_grad_norms, vmap_sq_grad_norms

C = 6


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _stats(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, b, rm = (torch.randn(C, dtype=torch.float64, generator=gen) for _ in range(3))
    rv = torch.rand(C, dtype=torch.float64, generator=gen) + 0.5
    return w.requires_grad_(), b.requires_grad_(), rm, rv


def _explicit(kind, z, w, b, rm, rv, eps=1e-5):
    """The normalization written with elementary ops (an independent reference)."""
    view = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    if kind == "eval":
        return (z - view(rm)) / torch.sqrt(view(rv) + eps) * view(w) + view(b)
    dims = (0, 2, 3) if kind == "train" else (2, 3)
    mean, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * view(w) + view(b)


def _kernel(kind, z, w, b, rm, rv):
    if kind == "instance":
        return F.instance_norm(z, weight=w, bias=b)
    return F.batch_norm(z, rm.clone(), rv.clone(), w, b, training=kind == "train")


@pytest.mark.parametrize("kind", ["eval", "train", "instance"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_kernels_on_one_example_give_the_written_out_gradients(kind, channels_last):
    w, b, rm, rv = _stats()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, C, 3, 3, dtype=torch.float64, generator=gen)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    # the gradient x.flatten(2).transpose(1, 2) hands back: channels-last strides
    g = torch.randn(1, 9, C, dtype=torch.float64, generator=gen).transpose(1, 2).reshape(1, C, 3, 3)
    assert g.is_contiguous(memory_format=torch.channels_last)
    want = torch.autograd.grad(_explicit(kind, z, w, b, rm, rv), (z, w, b), g)
    with OneExampleLayout():
        out = _kernel(kind, z, w, b, rm, rv)
    ours = torch.autograd.grad(out, (z, w, b), g, create_graph=True)
    assert all(rel_err(a, r) < 1e-12 for a, r in zip(ours, want))
    # and second derivatives through the relayout
    u = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in ours[:2]]
    second = lambda gs: torch.autograd.grad(gs[:2], (z, w), u, allow_unused=True)  # noqa: E731
    want2 = second(torch.autograd.grad(_explicit(kind, z, w, b, rm, rv), (z, w, b), g,
                                       create_graph=True))
    for a, r in zip(second(ours), want2):
        assert (a is None and r is None) or rel_err(a, r) < 1e-10


class PatchEmbed(nn.Module):
    """A convolutional patch embedding as in XCiT: conv + BatchNorm (eval), tokens [N, T, C]."""

    def __init__(self, extra=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        # a scale that meets the data in an op no rule covers (torch.lerp): sends this module
        # to the per-example loop
        self.log_scale = nn.Parameter(torch.zeros(1)) if extra else None

    def forward(self, x):
        if self.log_scale is not None:
            x = torch.lerp(x, 2 * x, self.log_scale)
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


def _model(extra):
    torch.manual_seed(0)
    model = nn.Sequential(PatchEmbed(extra), nn.Flatten(), nn.Tanh(), nn.Linear(4 * C, 3)).double()
    with torch.no_grad():
        model[0].bn.weight.normal_()
        model[0].bn.running_mean.normal_()
        model[0].bn.running_var.uniform_(0.5, 2)
    return model.eval()


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("extra", [False, True], ids=["rules", "fallback"])
def test_batch_of_one_paths_agree_with_vmap_and_the_batched_tape(extra):
    model = _model(extra)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    ref = vmap_sq_grad_norms(model, ce, x, y)
    assert rel_err(loop_sq_grad_norms(model, ce, x, y), ref) < 1e-12  # the loop reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        batched = tape.per_example_sq_grad_norms(ce(out, y))  # fallback: one example at a time
        assert any("fallback" in m for m in tape.methods.values()) == extra, tape.methods
        assert rel_err(batched, ref) < 1e-12
        for i in range(3):  # a tape on a batch of one
            with curvreg.GradNormTape(model) as tape:
                out = model(x[i:i + 1])
            one = tape.per_example_sq_grad_norms(ce(out, y[i:i + 1]))
            assert rel_err(one, ref[i:i + 1]) < 1e-12


@pytest.mark.parametrize("shape", [(1, C, 3, 3), (2, C, 3, 3)])
def test_the_tapes_own_call_of_the_kernel_on_one_example(shape):
    """``batchnorm._centered`` (the batch-statistics path's call of PyTorch's backward kernel)
    with a channels-last gradient, against the formula written out."""
    from curvreg.batchnorm import _centered
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    w = torch.randn(C, dtype=torch.float64, generator=gen)
    g = torch.randn(shape[0], 9, C, dtype=torch.float64, generator=gen).transpose(1, 2).reshape(shape)
    dims = (0, 2, 3)
    want = (w.view(1, -1, 1, 1) * (g - g.mean(dims, keepdim=True)
                                   - x * (g * x).mean(dims, keepdim=True)),
            (g * x).sum(dims), g.sum(dims))
    for got, ref in zip(_centered(g, x, w, (True, True, True)), want):
        assert rel_err(got, ref) < 1e-12
