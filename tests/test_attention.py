"""nn.MultiheadAttention under the tape: PyTorch's function rewritten with rule ops
(curvreg.attention) computes the same outputs and attention weights, and the tape then needs no
per-example loop for it; cross-attention still takes the exact loop fallback."""
import unittest.mock
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvreg
from curvreg.attention import decompose
from curvreg.reference import loop_sq_grad_norms

from models import build, ce


def call_args(mha, q, kv=None, **kw):
    """(reference output, the (args, kwargs) the module passed to F.multi_head_attention_forward)
    for self-attention on ``q``, or attention of ``q`` over ``kv``."""
    seen = {}
    real = F.multi_head_attention_forward

    def spy(*a, **k):
        seen["call"] = (a, k)
        return real(*a, **k)

    kv = q if kv is None else kv
    with unittest.mock.patch.object(F, "multi_head_attention_forward", spy):
        ref = mha(q, kv, kv, **kw)
    return ref, seen["call"]


L, N, E = 5, 3, 8
CONFIGS = [dict(need_weights=False), dict(), dict(average_attn_weights=False),
           dict(attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1), need_weights=False),
           dict(attn_mask=torch.randn(L, L, dtype=torch.float64)),
           dict(key_padding_mask=torch.tensor([[False] * (L - 1) + [True]] * N)),
           dict(key_padding_mask=torch.tensor([[False] * (L - 2) + [True] * 2] * N), need_weights=False),
           dict(attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1), is_causal=True,
                need_weights=False)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "+".join(kw) or "default")
@pytest.mark.parametrize("batch_first", [False, True])
def test_decomposition_equals_pytorch(kw, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 2, batch_first=batch_first).double()
    x = torch.randn(N, L, E, dtype=torch.float64) if batch_first else torch.randn(L, N, E, dtype=torch.float64)
    (ref_out, ref_w), (args, kwargs) = call_args(mha, x, **kw)
    out, w = decompose(args, kwargs)()
    out = out.transpose(0, 1) if batch_first else out  # the module transposes back
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert (w is None) == (ref_w is None)
    if w is not None:
        torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)


def test_unsupported_calls_go_to_pytorch():
    mha = nn.MultiheadAttention(E, 2, kdim=4, vdim=4).double()
    x, m = torch.randn(L, N, E, dtype=torch.float64), torch.randn(L, N, 4, dtype=torch.float64)
    _, call = call_args(mha, x, m)
    assert decompose(*call) is None  # cross-attention with separate projections


@pytest.mark.parametrize("case,fallback", [("attention", False), ("fallback_attention", True)])
def test_self_attention_runs_on_rules_and_cross_attention_on_the_exact_loop(case, fallback):
    model, x, y = build(case, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert ("fallback" in tape.methods.get("attn", "")) == fallback
    ref = loop_sq_grad_norms(model, ce, x, y)
    assert ((sq - ref).norm() / ref.norm()).item() < 1e-9


def test_transformer_encoder_layer_trains_through_the_penalty():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 4, 3)).double()
    x, y = torch.randn(3, 4, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert not any("fallback" in m for m in tape.methods.values())
    params = list(model.parameters())
    ours = torch.autograd.grad(sq.mean(), params)
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs a double-differentiable kernel too
        ref = torch.autograd.grad(loop_sq_grad_norms(model, ce, x, y, create_graph=True).mean(), params)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert ((flat(ours) - flat(ref)).norm() / flat(ref).norm()).item() < 1e-8
