"""Weight-standardized convolutions (timm's StdConv2d, ScaledStdConv2d, Hugging Face's
WeightStandardizedConv2d) on their own rule:
norms and penalty gradients against the batch-size-1 loop in float64, per example and per
group, through both of the rule's forms (ghost norm; materialized gradients when a module is
called twice), and the forward check that refuses a class whose forward changed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg
from curvreg.reference import loop_sq_grad_norms

timm_layers = pytest.importorskip("timm.layers")


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _model(groups):
    torch.manual_seed(0)
    model = nn.Sequential(timm_layers.StdConv2d(4, 4, 3, stride=2, groups=groups), nn.GELU(),
                          timm_layers.ScaledStdConv2d(4, 4, 3, groups=groups),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # gains away from their initial ones
        model[2].gain.mul_(torch.rand_like(model[2].gain) + 0.5)
    return model, torch.randn(4, 4, 9, 9, dtype=torch.float64), torch.randint(0, 3, (4,))


def _group_reference(model, x, y, m):
    params = list(model.parameters())
    sq = []
    for k in range(0, x.shape[0], m):
        g = torch.autograd.grad(ce(model(x[k:k + m]), y[k:k + m]).mean(), params, create_graph=True)
        sq.append(sum(t.pow(2).sum() for t in g))
    return torch.stack(sq)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("m", [1, 2])
def test_std_convs_are_exact_on_their_rule(groups, m):
    model, x, y = _model(groups)
    params = list(model.parameters())
    with curvreg.GradNormTape(model, group_size=m) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert tape.methods == {"0": "exact", "2": "exact", "5": "exact"}  # no loop fallback
    assert tape.recording.calls[0].output is not None  # StdConv2d's rule reads its output
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True) if m == 1 else \
        _group_reference(model, x, y, m)
    assert rel_err(sq, ref) < 1e-10
    ours = torch.autograd.grad(sq.mean(), params)
    want = torch.autograd.grad(ref.mean(), params)
    for a, b in zip(ours, want):
        assert rel_err(a, b) < 1e-10


class _Twice(nn.Module):
    """One ScaledStdConv2d applied twice: its parameters' per-example gradients of the two calls
    are summed before squaring, through the rule's materialized ``grads``."""

    def __init__(self, conv=None):
        super().__init__()
        self.conv = conv if conv is not None else timm_layers.ScaledStdConv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))).mean((2, 3)))


def _hf_std_conv(*args, **kwargs):
    bit = pytest.importorskip("transformers.models.bit.modeling_bit")
    return bit.WeightStandardizedConv2d(*args, **kwargs)


@pytest.mark.parametrize("hf", [False, True])
def test_a_std_conv_called_twice_sums_its_gradients_before_squaring(hf):
    torch.manual_seed(1)
    model = _Twice(_hf_std_conv(3, 3, 3, stride=2, padding="SAME", eps=1e-8) if hf else None).double()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (3,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert "fallback" not in tape.methods["conv"]
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert rel_err(sq, ref) < 1e-10
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(sq.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert rel_err(a, b) < 1e-10


def test_a_changed_std_conv_forward_is_refused(monkeypatch):
    """The rule models one forward; a class whose forward differs (here: unbiased variance)
    is refused before a value is returned."""
    model, x, y = _model(1)

    def unbiased(self, x):
        w = self.weight.flatten(1)
        w = ((w - w.mean(1, keepdim=True)) / (w.var(1, keepdim=True) + self.eps).sqrt())
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)

    monkeypatch.setattr(timm_layers.StdConv2d, "forward", unbiased)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match="StdConv2d's forward is not the weight-standardized"):
        tape.per_example_sq_grad_norms(ce(out, y))


def test_a_std_conv_output_modified_in_place_is_recomputed_not_read():
    """The StdConv2d rule reads conv(x, w_hat) off the layer's output; after an in-place
    ReLU on that output it recomputes it instead, and stays exact."""
    torch.manual_seed(2)
    model = nn.Sequential(timm_layers.StdConv2d(3, 4, 3), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (3,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    assert tape.recording.calls[0].output is None  # modified by the in-place ReLU
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert rel_err(sq, loop_sq_grad_norms(model, ce, x, y)) < 1e-10


def test_hugging_face_weight_standardized_convs_with_their_padding_are_exact():
    """transformers' WeightStandardizedConv2d (BiT): 'SAME' padding with stride 2 pads the input
    in a module of its own (DynamicPad2d) before the convolution; the rule sees the padded input."""
    torch.manual_seed(3)
    model = nn.Sequential(_hf_std_conv(3, 4, 3, stride=2, padding="SAME", eps=1e-8),
                          nn.Tanh(), _hf_std_conv(4, 4, 3, groups=2, bias=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    assert model[0].pad is not None and model[2].pad is None
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert tape.methods == {"0": "exact", "2": "exact", "5": "exact"}
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert rel_err(sq, ref) < 1e-10
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(sq.mean(), params), torch.autograd.grad(ref.mean(), params)):
        assert rel_err(a, b) < 1e-10
