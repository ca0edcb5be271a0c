"""The fused dense-layer path (curvreg.fused) against plain autograd, in float64."""
import pytest
import torch

import curvreg

from models import build, ce, node_names

CASES = ["mlp", "mlp_gelu_nobias", "recurrent", "shared_pair", "frozen", "fallback_custom",
         "layernorm_groupnorm", "conv2d_stride_pad",
         # sequences (rows = examples x positions), a weight tied to an embedding, attention's
         # projections, and a weight stored [in, out] under torch.addmm (GPT-2's Conv1D)
         "linear_seq_gram", "linear_seq_materialize", "linear_rank4", "layernorm_seq",
         "tied_embedding", "attention", "transposed_weights_inner"]


def objective(model, x, y, fuse, alpha=0.37):
    with curvreg.GradNormTape(model, fuse_linear=fuse) as tape:  # True forces fusing at these tiny sizes
        out = model(x)
    losses = ce(out, y)
    sq = tape.per_example_sq_grad_norms(losses)
    return losses.mean() + alpha * sq.mean(), tape


def flat(gs):
    return torch.cat([g.flatten() for g in gs])


@pytest.mark.filterwarnings("ignore::curvreg.FallbackWarning")
@pytest.mark.parametrize("case", CASES)
def test_fused_gradient_equals_plain_autograd(case):
    model, x, y = build(case, n=5)
    params = [p for p in model.parameters() if p.requires_grad]
    obj, tape = objective(model, x, y, fuse=True)
    assert tape.recording.holders, "the fused path was not taken"
    assert "LinearInputGradBackward" in node_names(obj.grad_fn)
    fused = torch.autograd.grad(obj, params)
    assert all(not h.stash for h in tape.recording.holders)  # every stash was consumed
    obj_plain, tape_plain = objective(model, x, y, fuse=False)
    assert not tape_plain.recording.holders
    assert "LinearInputGradBackward" not in node_names(obj_plain.grad_fn)
    plain = torch.autograd.grad(obj_plain, params)
    assert torch.allclose(obj, obj_plain, rtol=1e-13, atol=0)
    assert torch.allclose(flat(fused), flat(plain), rtol=1e-11, atol=1e-13)


def test_third_order_derivatives_with_create_graph():
    model, x, y = build("mlp", n=4)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    out = []
    for fuse in (True, False):
        obj, _ = objective(model, x, y, fuse)
        g = torch.autograd.grad(obj, params, create_graph=True)
        out.append(flat(torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)))
    assert torch.allclose(out[0], out[1], rtol=1e-10, atol=1e-12)


def test_partial_and_repeated_backward_do_not_reuse_stashes():
    # A backward that stops at the logits runs the delta chain but not the last layer's own
    # node, so it leaves a stash behind; the next backward must not consume it (double count).
    # Two backward passes over one graph must accumulate exactly twice the gradient.
    model, x, y = build("mlp", n=5)
    x.requires_grad_(True)
    grads = []
    for fuse in (True, False):
        model.zero_grad(set_to_none=True)
        with curvreg.GradNormTape(model, fuse_linear=fuse) as tape:  # True: fuse at tiny sizes
            logits = model(x)
        losses = ce(logits, y)
        obj = losses.mean() + 0.37 * tape.per_example_sq_grad_norms(losses).mean()
        gx = torch.autograd.grad(obj, x, retain_graph=True)[0]
        torch.autograd.grad(obj, logits, retain_graph=True)
        if fuse:
            assert any(h.stash for h in tape.recording.holders)  # left behind by the logits-only pass
        obj.backward(retain_graph=True)
        obj.backward()
        grads.append((gx, flat([p.grad for p in model.parameters()])))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-11, atol=1e-13)
    model.zero_grad(set_to_none=True)
    obj, _ = objective(model, x, y, True)
    obj.backward()
    assert torch.allclose(grads[0][1], 2 * flat([p.grad for p in model.parameters()]), rtol=1e-11)


def test_which_calls_are_fused():
    # F.linear on any number of leading dims and torch.addmm(b, x, W) with a trainable W;
    # not x @ W, and nothing when the norms are taken without a graph
    for case, expect in (("linear_seq_gram", 2), ("linear_rank4", 2), ("transposed_weights_inner", 2)):
        model, x, y = build(case, n=3)
        with curvreg.GradNormTape(model, fuse_linear=True) as tape:
            model(x)
        assert len(tape.recording.holders) == expect, case
    model, x, y = build("mlp", n=3)
    with curvreg.GradNormTape(model, fuse_linear=True) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y), create_graph=False)
    assert not sq.requires_grad and len(tape.recording.holders) == 2


def test_auto_policy_fuses_only_wide_layers():
    # "auto" fuses when d_in d_out > 2N (d_in + d_out): here the 64x64 layer at N = 4, but not
    # the 64 -> 3 head, and nothing at N = 32.
    model = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 3)).double()
    for n, expect in ((4, 1), (32, 0)):
        with curvreg.GradNormTape(model) as tape:
            model(torch.randn(n, 5, dtype=torch.float64))
        assert len(tape.recording.holders) == expect
    # a sequence counts its rows: 4 examples of 8 positions are 32 rows
    with curvreg.GradNormTape(model) as tape:
        model(torch.randn(4, 8, 5, dtype=torch.float64))
    assert not tape.recording.holders
    with curvreg.GradNormTape(model) as tape:
        model(torch.randn(4, 1, 5, dtype=torch.float64))
    assert len(tape.recording.holders) == 1
