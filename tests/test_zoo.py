"""Real architectures (torchvision, timm, Hugging Face transformers, torch.nn) in their default
configurations, built small, float64: the tape's norms and penalty gradients against the
batch-size-1 loop, or the expected clear refusal. Marked ``zoo``; part of the full suite."""
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvreg
from curvreg.reference import loop_sq_grad_norms

from models import ce
from zoo import ZOO, build

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

# name -> what the refusal must say (an op PyTorch cannot differentiate twice, or a layout)
REFUSED = {
    "tv_mobilenet_v3_small": r"F\.hardsigmoid / nn\.Hardsigmoid in module 'features\.1\.block\.1'.*clamp",
    "timm_mobilenetv3": r"F\.hardsigmoid / nn\.Hardsigmoid in module 'blocks\.0\.0\.se'.*clamp",
    "timm_swin": r"module 'layers\.0\.blocks\.0\.attn' \(WindowAttention\) produced an output with "
                 r"dim 0 of size 12, not the batch size 3",
}
# Llama's RMSNorm computes in float32 whatever the model's dtype
TOLERANCE = {"hf_llama": 1e-6}
# Module calls that still take the exact per-example loop (no fast rule yet), per architecture;
# every other architecture runs on rules alone. A change either way fails, so improvements and
# regressions are both noticed (and this list and the README's are updated together).
FALLBACK = {
    "tv_vit": {"encoder.layers.encoder_layer_0.self_attention"},       # MHA (one opaque op)
    "tv_swin": {"features.1.0.attn", "features.3.0.attn"},             # relative position bias
    "nn_transformer_encoder": {"0.layers.0.self_attn"},                 # MHA (one opaque op)
    "nn_lstm": {"gru", "rnn"},                                          # recurrent cells
    "timm_scaled_std_conv": {"0", "2"},                                 # weight standardization
    "timm_resnetv2_bit": None,                                          # every StdConv2d (17)
}


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
    expected = FALLBACK.get(name, set())
    if expected is None:
        assert fallback and all(type(model.get_submodule(p)).__name__ == "StdConv2d" for p in fallback)
    else:
        assert fallback == expected
    ours = torch.autograd.grad(0.3 * sq.mean(), params, allow_unused=True)
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs a double-differentiable kernel too
        ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
        want = torch.autograd.grad(0.3 * ref.mean(), params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                                 for g, p in zip(gs, params)])
    tol = TOLERANCE.get(name, 1e-8)
    assert rel_err(sq, ref) < tol
    assert rel_err(flat(ours), flat(want)) < tol
