"""Real architectures (torchvision, timm, Hugging Face transformers, torch.nn) in their default
configurations, built small, float64, each checked against two independent references, or the
expected clear refusal: the norms against the batch-size-1 loop and torch.func's vmap(grad)
(first-order, where vmap can run the model), the penalty gradient against double backprop
through the loop and a central finite difference of the loop's penalty along a random
direction (torch.func is not used for the gradient: its double backward through layer_norm and
batch_norm under vmap is wrong). Marked ``zoo``; part of the full suite."""
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvreg
from curvreg.reference import loop_sq_grad_norms, vmap_sq_grad_norms

from models import ce
from zoo import ZOO, build

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

# name -> what the refusal must say (an op PyTorch cannot differentiate twice, a weight
# computed by a parametrization)
REFUSED = {
    "tv_mobilenet_v3_small": r"F\.hardsigmoid / nn\.Hardsigmoid in module 'features\.1\.block\.1'.*clamp",
    "timm_mobilenetv3": r"F\.hardsigmoid / nn\.Hardsigmoid in module 'blocks\.0\.0\.se'.*clamp",
    "hf_wav2vec2": r"module 'model\.wav2vec2\.encoder\.pos_conv_embed\.conv\.parametrizations\.weight' "
                   r"\(ParametrizationList\) computes a parameter from parameters alone.*"
                   r"remove_parametrizations",
}
# Llama's and Gemma's RMSNorms compute in float32 whatever the model's dtype
TOLERANCE = {"hf_llama": 1e-6, "hf_gemma": 1e-6}
# Module calls that still take the exact per-example loop (no fast rule yet), per architecture;
# every other architecture runs on rules alone. A change either way fails, so improvements and
# regressions are both noticed (and this list and the README's are updated together).
FALLBACK = {
    "nn_lstm": {"gru", "rnn"},  # recurrent cells
}


# models torch.func's vmap cannot run (their values are checked against the loop alone)
NO_VMAP = {"hf_gpt2": "data-dependent control flow (.item()) in its attention mask",
           "hf_bart": "torch.unique_consecutive (a dynamic shape) in its end-of-sequence check",
           "hf_t5": "torch.unique_consecutive (a dynamic shape) in its end-of-sequence check",
           "hf_deberta_v2": "data-dependent control flow in its missing-attention-mask warning",
           "hf_deberta_v2_relative": "the same",
           "hf_deberta_relative": "the same",
           "hf_bloom": "its GELU's autograd.Function has no setup_context for torch.func",
           "nn_lstm": "the RNN kernels under vmap"}


# The penalty is only piecewise smooth through these (a unit crossing a kink, a max switching
# its argmax): a finite difference there measures the jumps, not the derivative.
PIECEWISE = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.Hardswish,
             torch.nn.Hardsigmoid, torch.nn.MaxPool1d, torch.nn.MaxPool2d)
# Llama's, Gemma's and Mistral's RMSNorms compute in float32: the penalty is smooth at a coarser
# scale
FD_STEP = {"hf_llama": (1e-3, 1e-3), "hf_gemma": (1e-3, 1e-3),  # name -> (step, tolerance)
           "hf_mistral": (1e-3, 1e-3),
           # DeBERTa's relative attention: the difference agrees to 2.6e-6 at a step of 1e-4 and
           # drifts below it (3.6e-3 at 1e-5, 8.7e-3 at 1e-6), noise of its own computation
           "hf_deberta_relative": (1e-4, 1e-5)}


def finite_difference(model, x, y, params, v, eps=1e-5):
    """(R(theta + eps v) - R(theta - eps v)) / (2 eps), R the loop's mean penalty."""
    def shift(scale):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=scale)

    shift(eps)
    up = loop_sq_grad_norms(model, ce, x, y).mean()
    shift(-2 * eps)
    down = loop_sq_grad_norms(model, ce, x, y).mean()
    shift(eps)
    return ((up - down) / (2 * eps)).item()


def _fix_padding_rows(model, params, v):
    """Zero the direction on embeddings' ``padding_idx`` rows: PyTorch defines their gradient as
    zero although the forward reads them (ESM's position ids at padding tokens), so a finite
    difference along them measures what autograd, and the tape with it, leaves out by design."""
    index = {id(p): i for i, p in enumerate(params)}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None and id(m.weight) in index:
            v[index[id(m.weight)]][m.padding_idx] = 0


def flat(grads, params):
    """Gradients of ``params`` as one vector (None: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_exact_or_refused(name):
    model, x, y = build(name, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    if name in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name]):
            with curvreg.GradNormTape(model) as tape:
                out = model(x)
            tape.per_example_sq_grad_norms(ce(out, y))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
    fallback = {p for p, m in tape.methods.items() if "fallback" in m}
    assert fallback == FALLBACK.get(name, set())
    ours = torch.autograd.grad(0.3 * sq.mean(), params, allow_unused=True)
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs a double-differentiable kernel too
        ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
        want = torch.autograd.grad(0.3 * ref.mean(), params, allow_unused=True)
    tol = TOLERANCE.get(name, 1e-8)
    assert rel_err(sq, ref) < tol
    assert rel_err(flat(ours, params), flat(want, params)) < tol
    if name not in NO_VMAP:
        with sdpa_kernel(SDPBackend.MATH):
            assert rel_err(sq, vmap_sq_grad_norms(model, ce, x, y)) < tol
    if any(isinstance(m, PIECEWISE) for m in model.modules()):
        return  # the gradient's reference is the loop's double backprop alone
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.numel() ** 0.5 for p in params]
    _fix_padding_rows(model, params, v)
    step, fd_tol = FD_STEP.get(name, (1e-5, 1e-5))
    with sdpa_kernel(SDPBackend.MATH):
        fd = 0.3 * finite_difference(model, x, y, params, v, step)
    ad = sum((g * d).sum() for g, d in zip(ours, v) if g is not None).item()
    assert abs(ad - fd) <= fd_tol * abs(fd), (ad, fd)


# Every dense layer through the fused weight-gradient path (curvreg.fused: F.linear on [N, T, d],
# GPT-2's torch.addmm with a weight stored [in, out]) against the tape without it, which the test
# above checks against the references.
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert", "timm_vit", "nn_transformer_encoder"])
def test_zoo_fused_dense_layers_as_unfused(name):
    model, x, y = build(name, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = []
    for fuse in (True, False):
        with curvreg.GradNormTape(model, fuse_linear=fuse) as tape:
            out = model(x)
        losses = ce(out, y)
        sq = tape.per_example_sq_grad_norms(losses)
        assert bool(tape.recording.holders) == fuse
        grads = torch.autograd.grad(losses.mean() + 0.3 * sq.mean(), params, allow_unused=True)
        got.append((sq.detach(), torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                            for g, p in zip(grads, params)])))
    (sq_fused, g_fused), (sq_plain, g_plain) = got
    assert rel_err(sq_fused, sq_plain) < 1e-12
    assert rel_err(g_fused, g_plain) < 1e-11


@pytest.mark.parametrize("name", ["hf_t5", "hf_bert"])
def test_position_tables_when_the_sequence_is_as_long_as_the_batch(name):
    """T = N: T5's relative position bias ([T, T, heads] from constant buckets) and BERT's
    position embeddings have a leading dim equal to the batch size; their ids are made without
    the model's inputs, so they are still expanded where they meet the batch."""
    model, x, y = build(name, 6)  # the zoo's sequences have T = 6
    assert x.shape == (6, 6)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert all(m == "exact" for m in tape.methods.values())
    with sdpa_kernel(SDPBackend.MATH):
        ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert rel_err(sq, ref) < 1e-8
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(sq.mean(), params, allow_unused=True)
    want = torch.autograd.grad(ref.mean(), params, allow_unused=True)
    assert rel_err(flat(ours, params), flat(want, params)) < 1e-8
