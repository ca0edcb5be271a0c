"""Exactness of GradNormTape against brute force in float64 (values and penalty gradients)."""
import warnings

import pytest
import torch

import curvreg
from curvreg.reference import loop_sq_grad_norms, vmap_sq_grad_norms

from models import CASES, build, ce, node_names


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def tape_sq(model, x, y, group_size=1, create_graph=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model, group_size=group_size) as tape:
            out = model(x)
        return tape.per_example_sq_grad_norms(ce(out, y), create_graph=create_graph)


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_match_loop_and_vmap(case):
    model, x, y = build(case, n=5)
    sq = tape_sq(model, x, y)
    assert sq.shape == (5,)
    ref = loop_sq_grad_norms(model, ce, x, y)
    assert rel_err(sq, ref) < 1e-9
    if case != "fallback_attention":  # attention under vmap(grad) of the whole model: loop suffices
        assert rel_err(sq, vmap_sq_grad_norms(model, ce, x, y)) < 1e-9


@pytest.mark.parametrize("case", sorted(CASES))
def test_penalty_gradient_matches_double_backprop(case):
    model, x, y = build(case, n=4)
    params = [p for p in model.parameters() if p.requires_grad]
    alpha = 0.37
    ours = torch.autograd.grad(alpha * tape_sq(model, x, y).mean(), params)
    ref_sq = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    ref = torch.autograd.grad(alpha * ref_sq.mean(), params)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert rel_err(flat(ours), flat(ref)) < 1e-8


@pytest.mark.parametrize("case", ["mlp", "conv2d_stride_pad", "linear_seq_gram", "conv2d_gram_small_map",
                                  "embedding_padding_idx", "layernorm_groupnorm", "tied_embedding",
                                  "fallback_custom"])
@pytest.mark.parametrize("group_size", [2, 6])
def test_group_size(case, group_size):
    model, x, y = build(case, n=6)
    sq = tape_sq(model, x, y, group_size=group_size)
    assert sq.shape == (6 // group_size,)
    assert rel_err(sq, loop_sq_grad_norms(model, ce, x, y, group_size=group_size)) < 1e-9


def test_group_size_n_is_full_batch_gradient_norm():
    model, x, y = build("mlp", n=8)
    sq = tape_sq(model, x, y, group_size=8)
    g = torch.autograd.grad(ce(model(x), y).mean(), list(model.parameters()))
    assert torch.allclose(sq[0], sum(t.pow(2).sum() for t in g), rtol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "conv2d_same_groups_nobias", "tied_embedding", "recurrent"])
def test_batch_of_one(case):
    model, x, y = build(case, n=1)
    assert rel_err(tape_sq(model, x, y), loop_sq_grad_norms(model, ce, x, y)) < 1e-9


@pytest.mark.parametrize("case", ["conv2d_stride_pad", "fallback_custom", "fallback_attention"])
def test_create_graph_false_is_detached_and_equal(case):
    model, x, y = build(case, n=4)
    a = tape_sq(model, x, y, create_graph=False)
    assert not a.requires_grad
    assert torch.allclose(a, tape_sq(model, x, y).detach(), rtol=1e-12)
    assert torch.allclose(a, loop_sq_grad_norms(model, ce, x, y), rtol=1e-10)


@pytest.mark.parametrize("case", ["mlp", "conv2d_stride_pad"])
def test_gradcheck(case):
    model, x, y = build(case, n=3)
    params = tuple(model.parameters())

    def penalty(*_):  # gradcheck perturbs the parameters in place
        return tape_sq(model, x, y).mean()

    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_forward_with_two_branches_of_the_same_batch_adds_contributions():
    model, x, y = build("mlp", n=4)
    with curvreg.GradNormTape(model) as tape:
        out = model(x) + 0.5 * model(2 * x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    params = list(model.parameters())
    expected = []
    for i in range(4):
        xi = x[i:i + 1]
        li = ce(model(xi) + 0.5 * model(2 * xi), y[i:i + 1]).sum()
        expected.append(sum(g.pow(2).sum() for g in torch.autograd.grad(li, params)))
    assert rel_err(sq, torch.stack(expected)) < 1e-9


def test_fallback_warns_once_with_module_names():
    model, x, y = build("fallback_custom", n=3)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.warns(curvreg.FallbackWarning, match=r"module '1' \(Scale\)"):
        tape.per_example_sq_grad_norms(ce(out, y))


def test_float32_close_to_float64():
    model, x, y = build("conv2d_stride_pad", n=4)
    ref = tape_sq(model, x, y)
    sq32 = tape_sq(model.float(), x.float(), y)
    assert rel_err(sq32.double(), ref) < 1e-4


CONV_MATERIALIZED = ["conv2d_stride_pad", "conv1d_stride_dilation", "conv2d_same_groups_nobias",
                     "conv2d_reflect_circular", "conv3d"]


@pytest.mark.parametrize("case", CONV_MATERIALIZED)
def test_conv_materialized_penalty_third_derivatives(case):
    # The materialized conv norm is an autograd.Function with a hand-written backward; under
    # create_graph that backward must itself be differentiable: a Hessian-vector product of
    # the penalty against double backprop through the batch-size-1 reference.
    model, x, y = build(case, n=4)
    params = [p for p in model.parameters() if p.requires_grad]
    sq = tape_sq(model, x, y)
    assert "_MaterializedSqNormBackward" in node_names(sq.grad_fn)
    ref_sq = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    out = []
    for s in (sq, ref_sq):
        g = torch.autograd.grad(s.mean(), params, create_graph=True)
        hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
        out.append(torch.cat([h.flatten() for h in hv]))
    assert rel_err(out[0], out[1]) < 1e-8


@pytest.mark.parametrize("group_size", [1, 2])
def test_conv_materialized_penalty_repeated_backward(group_size):
    # The first backward forms H = 2 s_bar G in G's storage; a second backward through the
    # retained graph must recompute G, not reuse the scaled buffer.
    model, x, y = build("conv2d_stride_pad", n=4)
    x.requires_grad_(True)
    with curvreg.GradNormTape(model, group_size=group_size) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    w = torch.arange(1.0, sq.numel() + 1, dtype=sq.dtype)
    first = torch.autograd.grad((w * sq).sum(), [x, *model.parameters()], retain_graph=True)
    second = torch.autograd.grad((w * sq).sum(), [x, *model.parameters()])
    ref_sq = loop_sq_grad_norms(model, ce, x, y, group_size=group_size, create_graph=True)
    ref = torch.autograd.grad((w * ref_sq).sum(), [x, *model.parameters()])
    for a, b, r in zip(first, second, ref):
        assert rel_err(a, r) < 1e-9 and rel_err(b, r) < 1e-9


def _outer_reference(a, b):
    return torch.bmm(b.transpose(1, 2), a).pow(2).sum((1, 2))


@pytest.mark.parametrize("shapes", [((2, 3, 3), (2, 3, 9)), ((2, 9, 3), (2, 3, 3)),
                                    ((2, 3, 9), (2, 9, 3))])  # x, y, the result smallest
def test_the_backward_factor_lands_on_the_smallest_operand_without_changing_the_product(shapes):
    from curvreg.rules._base import _bmm_times
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes)
    f = torch.tensor([2.0, -0.5], dtype=torch.float64).reshape(2, 1, 1)
    torch.testing.assert_close(_bmm_times(x, y, f), torch.bmm(x, y) * f, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("form", ["gram", "outer"])
def test_sequence_weight_norm_forms_are_exact_to_every_order(form, scaled):
    """The Gram form (2 (B B^T) A, 2 (A A^T) B) and the materialized form (2 B M, 2 A M^T,
    M = B^T A) with their own backward: gradcheck, gradgradcheck, and a second backward through
    a retained graph (the saved products are freed after the first). ``scaled``: groups of
    sizes 1e-9 to 1e13, which take the power-of-two scaling (``_Pow2Scales``)."""
    from torch.autograd import gradcheck, gradgradcheck

    from curvreg.rules._base import _Pow2Scales, gram_sq_norm, outer_sq_norm
    f = gram_sq_norm if form == "gram" else outer_sq_norm
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(3, 5, 2, dtype=torch.float64, generator=gen)
    if scaled:
        a = a * torch.tensor([1.0, 1e-7, 1e12], dtype=torch.float64).reshape(3, 1, 1)
        b = b * torch.tensor([1e-9, 1.0, 1e13], dtype=torch.float64).reshape(3, 1, 1)
    assert (_Pow2Scales(a, b).ea is not None) == scaled
    a, b = a.requires_grad_(), b.requires_grad_()
    if scaled:  # finite differences cannot resolve groups 1e22 apart: a Hessian product instead
        v = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in (a, b)]
        got, want = (torch.autograd.grad(torch.autograd.grad(g(a, b).sum(), [a, b], create_graph=True),
                                         [a, b], v) for g in (f, _outer_reference))
        for x, y in zip(got, want):
            for xk, yk in zip(x, y):
                assert rel_err(xk, yk) < 1e-12
    else:
        assert gradcheck(f, (a, b)) and gradgradcheck(f, (a, b))
    ref = _outer_reference(a, b)
    torch.testing.assert_close(f(a, b), ref, rtol=1e-13, atol=0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = (f(a, b) * w).sum()
    first = torch.autograd.grad(s, [a, b], retain_graph=True)
    second = torch.autograd.grad(s, [a, b])
    want = torch.autograd.grad((ref * w).sum(), [a, b])
    for x, y, z in zip(first, second, want):  # group by group: their sizes differ by 1e22
        for xk, yk, zk in zip(x, y, z):
            assert rel_err(xk, zk) < 1e-12 and rel_err(yk, zk) < 1e-12


@pytest.mark.parametrize("form", ["gram", "outer"])
def test_sequence_weight_norm_forms_avoid_subnormal_products_in_float32(form):
    """Deltas of 1e-20 (their products are below float32's smallest normal number, 1.2e-38):
    the scaled forms (slow unscaled on the CPU, not wrong) give the float64 value and gradients
    to float32 accuracy."""
    from curvreg.rules._base import _Pow2Scales, gram_sq_norm, outer_sq_norm
    f = gram_sq_norm if form == "gram" else outer_sq_norm
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 8, generator=gen, requires_grad=True)
    b = (torch.randn(2, 16, 6, generator=gen) * 1e-20).requires_grad_()
    assert _Pow2Scales(a, b).ea is not None
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    s, s64 = f(a, b), _outer_reference(a64, b64)
    assert rel_err(s.double(), s64) < 1e-5
    gb, gb64 = torch.autograd.grad(s.sum(), b)[0], torch.autograd.grad(s64.sum(), b64)[0]
    assert rel_err(gb.double(), gb64) < 1e-5


@pytest.mark.parametrize("nd,shape,stride,pad,dil,groups,c_out", [
    (2, (2, 4, 7, 7), 2, 1, 1, 2, 8), (2, (2, 6, 5, 5), 1, 1, 2, 6, 6), (1, (2, 4, 9), 2, 0, 1, 4, 8),
    (3, (1, 4, 5, 5, 5), 1, 1, 1, 2, 4)])
def test_grouped_conv_route_is_the_plain_convolution_to_every_order(nd, shape, stride, pad, dil, groups, c_out):
    """Grouped convolutions run through curvreg.grouped inside the tape: same values, and
    gradients to second order equal to the plain convolution's (gradcheck, gradgradcheck)."""
    import torch.nn.functional as F
    from torch.autograd import gradcheck, gradgradcheck

    from curvreg.batchnorm import Switch
    from curvreg.taped_conv import TapedConv
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(c_out, shape[1] // groups, *(3,) * nd, dtype=torch.float64, generator=gen,
                    requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, generator=gen, requires_grad=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    f = lambda x, w, b: TapedConv.apply(x, w, b, nd, (stride,) * nd, (pad,) * nd, (dil,) * nd,  # noqa: E731
                                          groups, Switch())
    assert torch.equal(f(x, w, b), conv(x, w, b, stride, pad, dil, groups))
    assert gradcheck(f, (x, w, b)) and gradgradcheck(f, (x, w, b))


def test_depthwise_conv_takes_the_grouped_route_and_stays_exact():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.nn.Tanh(),
                                torch.nn.Conv2d(4, 6, 1), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 25, 3)).double()
    torch.manual_seed(0)
    x, y = torch.randn(4, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert "TapedConvBackward" in node_names(out.grad_fn)
    assert rel_err(sq, loop_sq_grad_norms(model, ce, x, y)) < 1e-9
    params = list(model.parameters())
    ours = torch.autograd.grad(sq.mean(), params)
    ref = torch.autograd.grad(loop_sq_grad_norms(model, ce, x, y, create_graph=True).mean(), params)
    assert rel_err(torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in ref])) < 1e-8
