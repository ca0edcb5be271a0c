"""The flop count behind bench_zoo's "flops" column: a convolution's backward costs what its
forward does per gradient, grouped convolutions included (torch.utils.flop_counter's own
formula counts their weight gradient as a dense one's), and the in-place ``addmm_`` of the fused
dense path counts (PyTorch's counter skips it)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_zoo import FLOP_FORMULAS  # noqa: E402

import curvreg  # noqa: E402


def _flops(fn, custom):
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS if custom else None)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("groups,transposed", [(1, False), (8, False), (8, True), (1, True)])
def test_a_convolutions_backward_counts_one_forward_per_gradient(groups, transposed):
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, requires_grad=True)
    conv = F.conv_transpose2d if transposed else F.conv2d
    forward = _flops(lambda: conv(x, w, groups=groups, padding=1), True)
    y = conv(x, w, groups=groups, padding=1)
    for inputs, n in (((x, w), 2), ((w,), 1), ((x,), 1)):
        backward = _flops(lambda: torch.autograd.grad(y, inputs, torch.ones_like(y),
                                                      retain_graph=True), True)
        assert backward == n * forward
    if groups == 1:  # PyTorch's own formula agrees where it is right
        assert _flops(lambda: torch.autograd.grad(y, (x, w), torch.ones_like(y), retain_graph=True),
                      False) == 2 * forward


def test_the_fused_dense_paths_products_all_count():
    """The fused path accumulates one weight-gradient product per layer in place: with that
    counted, a fused exact step does as many products as an unfused one; PyTorch's counter
    alone finds fewer. (After a first step: the tape's once-per-model independence check
    adds a backward.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    x, y = torch.randn(4, 64), torch.randint(0, 3, (4,))

    def step(fuse):
        with curvreg.GradNormTape(model, fuse_linear=fuse) as tape:
            losses = F.cross_entropy(model(x), y, reduction="none")
        (losses.mean() + tape.per_example_sq_grad_norms(losses).mean()).backward()
    step(True)
    unfused = _flops(lambda: step(False), True)
    assert _flops(lambda: step(True), True) == unfused > _flops(lambda: step(True), False)
