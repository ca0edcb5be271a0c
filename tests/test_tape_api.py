"""Scope hygiene and every error path of GradNormTape."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg
from curvreg.reference import loop_sq_grad_norms, vmap_sq_grad_norms
from curvreg.rules import LayerRule

from models import build, ce


def hooks_of(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def attrs_of(model):
    return [sorted(vars(m)) for m in model.modules()] + [sorted(vars(p)) for p in model.parameters()]


def test_scope_leaves_no_state_and_keeps_mode():
    model, x, y = build("batchnorm_eval", n=3)
    before_hooks, before_attrs = hooks_of(model), attrs_of(model)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    tape.per_example_sq_grad_norms(ce(out, y))
    assert hooks_of(model) == before_hooks and attrs_of(model) == before_attrs
    assert all(not m.training for m in model.modules())
    mlp, x2, y2 = build("mlp", n=3)
    with curvreg.GradNormTape(mlp) as tape:
        mlp(x2)
    assert all(m.training for m in mlp.modules())


@pytest.mark.parametrize("mode", ["mlp", "windows"])
def test_a_recording_is_freed_without_the_garbage_collector(mode):
    """No reference cycle keeps a recording (and the activations it holds) alive after its tape
    is dropped: a step would otherwise carry the previous one's memory until a collection."""
    import gc
    import weakref
    model = _ParamChain(mode).double()
    x, y = torch.randn(3, 4, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    gc.collect()
    gc.disable()
    try:
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
        sq.sum().backward()
        ref = weakref.ref(tape.recording)
        del tape, out, sq
        assert ref() is None
    finally:
        gc.enable()


def test_hooks_removed_after_exception():
    model, x, _ = build("mlp", n=3)
    before = hooks_of(model)
    with pytest.raises(RuntimeError, match="boom"):
        with curvreg.GradNormTape(model):
            model(x)
            raise RuntimeError("boom")
    assert hooks_of(model) == before
    assert torch._C._len_torch_function_stack() == 0


def test_tape_reused_across_steps_and_twice_per_step():
    model, x, y = build("conv2d_stride_pad", n=4)
    tape = curvreg.GradNormTape(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        with tape:
            out = model(x)
        losses = ce(out, y)
        a = tape.per_example_sq_grad_norms(losses)
        b = tape.per_example_sq_grad_norms(losses, create_graph=False)
        assert torch.allclose(a.detach(), b)
        opt.zero_grad()
        (losses.mean() + 0.1 * a.mean()).backward()
        opt.step()


def test_losses_wrong_shape():
    model, x, y = build("mlp", n=3)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        tape.per_example_sq_grad_norms(ce(out, y).unsqueeze(1))
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        tape.per_example_sq_grad_norms(ce(out, y).mean())


def test_losses_not_from_taped_forward():
    model, x, y = build("mlp", n=3)
    other, _, _ = build("mlp", n=3, seed=1)
    with curvreg.GradNormTape(model) as tape:
        model(x)
    with pytest.raises(ValueError, match="not produced from the taped forward"):
        tape.per_example_sq_grad_norms(ce(other(x), y))
    with pytest.raises(ValueError, match="does not require grad"):
        tape.per_example_sq_grad_norms(ce(model(x).detach(), y))


def test_nothing_to_differentiate():
    model, x, y = build("mlp", n=3)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to differentiate"):
        with curvreg.GradNormTape(model):
            pass
    model2, _, _ = build("mlp", n=3)
    with curvreg.GradNormTape(model2) as tape:
        pass
    losses = (x.sum(1) * torch.ones(3, dtype=x.dtype, requires_grad=True))
    with pytest.raises(ValueError, match="nothing to differentiate"):
        tape.per_example_sq_grad_norms(losses)


def test_no_grad_and_dtype():
    model, x, y = build("mlp", n=3)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    losses = ce(out, y)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="no_grad"):
            tape.per_example_sq_grad_norms(losses)
    with pytest.raises(TypeError, match="floating-point"):
        tape.per_example_sq_grad_norms(y)


def test_forward_twice_with_different_batch_size():
    model, x, _ = build("mlp", n=4)
    with pytest.raises(ValueError, match=r"different batch sizes \(4, then 2\)"):
        with curvreg.GradNormTape(model):
            model(x)
            model(x[:2])


def test_losses_length_differs_from_forward():
    model, x, y = build("mlp", n=4)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match="batch size 4"):
        tape.per_example_sq_grad_norms(ce(out, y)[:3])


def test_batchnorm_training_rejected_before_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\).*batch_norm='unbiased'.*eval.*GroupNorm"):
        with curvreg.GradNormTape(model):
            model(torch.randn(2, 3, 5, 5, dtype=torch.double))
    assert calls == []


def test_batchnorm_switched_to_train_inside_scope_rejected():
    model, x, _ = build("batchnorm_eval", n=3)
    with pytest.raises(ValueError, match="BatchNorm in training mode.*batch_norm="):
        with curvreg.GradNormTape(model):
            model[1].train()
            model(x)


class _Center(nn.Module):
    """Scale by a parameter, then subtract the batch mean (mixes examples after the parameter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        h = x * self.w
        return h - h.mean(0)


class _FunctionalBN(nn.Module):
    """A parameter-free batch normalization inside a parent's forward, after a Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return F.batch_norm(self.lin(x), None, None, training=True)


def test_functional_batch_statistics_refused_at_the_op():
    model = nn.Sequential(_FunctionalBN(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"module '0' \(F.batch_norm\).*batch_norm='frozen'"):
        with curvreg.GradNormTape(model):
            model(torch.randn(4, 5, dtype=torch.double))


@pytest.mark.parametrize("make, where", [
    (_Center, r"op elementwise mul in module '0'"),
])
def test_mixing_after_a_parameter_is_refused(make, where):
    model = nn.Sequential(make(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 5, dtype=torch.double)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match=where + r".*changes the loss of example 2"):
        tape.per_example_sq_grad_norms(ce(out, torch.zeros(4, dtype=torch.long)))


def test_mixing_upstream_of_every_parameter_is_exact():
    """Centering the input before any parameter leaves l_i's dependence on theta per-example."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(4, 5, dtype=torch.double)
    y = torch.tensor([0, 1, 2, 0])
    xc = x - x.mean(0)
    with curvreg.GradNormTape(model) as tape:
        out = model(xc)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, xc, y), rtol=1e-12)


def exact_on_rules_or_refused(model, x, y, refusal):
    """The refusal (a regex) if one is given, else exact against the loop with every call on a
    rule."""
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            exact_against_loop(model, x, y)
        return
    tape, _ = exact_against_loop(model, x, y)
    assert set(tape.methods.values()) == {"exact"}


def exact_against_loop(model, x, y, rtol=1e-10, quiet=False):
    """(tape, norms) of a taped forward, after checking the norms and their penalty gradient
    against the batch-size-1 loop's (``quiet``: FallbackWarning silenced)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert torch.allclose(sq, ref, rtol=rtol)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(sq.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert torch.allclose(a, b, rtol=10 * rtol, atol=1e-12)
    return tape, sq


class _TokPos(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, ids):  # [N, T]
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # pos: [T, 4], broadcast
        return self.head(torch.tanh(h).mean(1))


def test_position_table_broadcast_over_the_batch_is_exact():
    model = _TokPos().double()
    ids, y = torch.randint(0, 9, (3, 5)), torch.tensor([0, 1, 2])
    with curvreg.GradNormTape(model) as tape:
        out = model(ids)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, ids, y), rtol=1e-10)
    # T == N: the position table's leading dim looks like the batch, but its ids are made
    # without the model's inputs (torch.arange), so it is expanded like any other
    ids, y = torch.randint(0, 9, (5, 5)), torch.tensor([0, 1, 2, 0, 1])
    with curvreg.GradNormTape(model) as tape:
        out = model(ids)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, ids, y), rtol=1e-10)


class _TiledPosition(nn.Module):
    """A position encoding computed from a fixed grid by a layer with parameters (XCiT's Fourier
    encoding), tiled over the batch with ``how`` ("repeat", "expand" or "expand_new": without a
    leading dim), then added to the tokens or used another way (``other_use``)."""

    def __init__(self, how, other_use=False):
        super().__init__()
        self.how, self.other_use = how, other_use
        self.proj, self.tok, self.head = nn.Linear(2, 4), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):  # [N, T, 3]
        n, t = x.shape[:2]
        grid = torch.linspace(0, 1, 2 * t, dtype=x.dtype).reshape(t, 2)
        pos = self.proj(grid if self.how == "expand_new" else grid.unsqueeze(0))  # [(1,) T, 4]
        tiled = {"repeat": lambda: pos.repeat(n, 1, 1), "expand": lambda: pos.expand(n, -1, -1),
                 "expand_new": lambda: pos.expand(n, t, 4)}[self.how]()
        h = self.tok(x) * tiled
        if self.other_use:
            h = h + pos.sum()
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("how", ["repeat", "expand", "expand_new"])
def test_position_encoding_tiled_over_the_batch_is_exact(how):
    model = _TiledPosition(how).double()
    x, y = torch.randn(3, 5, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(model, x, y)
    assert tape.methods["proj"] == "exact"
    model = _TiledPosition(how, other_use=True).double()  # the untiled tensor used elsewhere too
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match=r"op F.linear in module 'proj' has no example dimension"):
        tape.per_example_sq_grad_norms(ce(out, y))


class _RelativeBias(nn.Module):
    """T5-style attention: a relative position bias looked up from [T, T] buckets, taken through
    view ops and a torch.where with a fixed causal mask into the attention's mask, computed
    once and used by two attention layers (``other_use``: also summed into the output)."""

    def __init__(self, other_use=False):
        super().__init__()
        self.other_use = other_use
        self.bias = nn.Embedding(7, 2)  # buckets -> heads
        self.qkv, self.qkv2, self.head = nn.Linear(4, 12), nn.Linear(4, 12), nn.Linear(4, 3)

    def _attend(self, qkv, x, mask):
        n, t, _ = x.shape
        q, k, v = qkv(x).reshape(n, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, t, 4)

    def forward(self, x):  # [N, T, 4]
        t = x.shape[1]
        pos = torch.arange(t)
        buckets = (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3  # [T, T]
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)[:, :, -t:, :]  # [1, 2, T, T]
        causal = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
        mask = torch.where(causal, bias, -1e4)
        h = x + self._attend(self.qkv, x, mask)
        h = h + self._attend(self.qkv2, h, mask)
        if self.other_use:
            h = h + bias.sum()
        return self.head(h.mean(1))


@pytest.mark.parametrize("t", [3, 6, 7])  # T = N, T = 2N (a multiple of the batch), other
def test_a_relative_position_bias_through_views_into_attention_is_exact(t):
    torch.manual_seed(0)
    model = _RelativeBias().double()
    x, y = torch.randn(3, t, 4, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, sq = exact_against_loop(model, x, y)  # T = N too: the buckets are constants
    assert all(m == "exact" for m in tape.methods.values())
    assert torch.allclose(sq, vmap_sq_grad_norms(model, ce, x, y), rtol=1e-10)
    model = _RelativeBias(other_use=True).double()
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match=r"op F\.embedding in module 'bias' has no example dimension"):
        tape.per_example_sq_grad_norms(ce(out, y))


class _WindowBias(nn.Module):
    """Swin-style window attention: tokens [N, 2 * 3, 4] split into two windows of three,
    merged with the batch (example-major, or example-minor with ``minor``), and a relative
    position bias looked up from a [5, 2] table (``lookup``: how the table is indexed) added to
    the scores, or passed as the attention mask (``sdpa``)."""

    def __init__(self, lookup, minor=False, sdpa=False):
        super().__init__()
        self.lookup, self.minor, self.sdpa = lookup, minor, sdpa
        self.table = nn.Parameter(torch.randn(5, 2))
        pos = torch.arange(3)
        self.register_buffer("rel", (pos[None, :] - pos[:, None]).flatten())  # -2 .. 2
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def _bias(self):
        idx = self.rel + 2
        bias = {"negative": lambda: self.table[self.rel],  # indices counted from the end
                "index": lambda: self.table[idx], "tuple": lambda: self.table[(idx,)],
                "index_select": lambda: torch.index_select(self.table, 0, idx),
                "mask": lambda: self.table[torch.ones(5, dtype=torch.bool)][idx]}[self.lookup]()
        return bias.view(3, 3, 2).permute(2, 0, 1).contiguous().unsqueeze(0)  # [1, heads, 3, 3]

    def forward(self, x):  # [N, 6, 4]
        n = x.shape[0]
        w = x.reshape(n, 2, 3, 4)
        w = (w.transpose(0, 1) if self.minor else w).reshape(2 * n, 3, 4)  # [2N, 3, 4]
        q, k, v = self.qkv(w).reshape(2 * n, 3, 3, 2, 2).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias())
        else:
            h = torch.softmax(q @ k.transpose(-2, -1) + self._bias(), -1) @ v
        h = h.transpose(1, 2).reshape(*((2, n) if self.minor else (n, 2)), 3, 4)
        return self.head(torch.tanh(h.transpose(0, 1) if self.minor else h).mean((1, 2)))


@pytest.mark.parametrize("lookup", ["negative", "index", "tuple", "index_select"])
@pytest.mark.parametrize("sdpa", [False, True])
def test_a_relative_position_bias_in_window_attention_is_exact(lookup, sdpa):
    torch.manual_seed(0)
    x, y = torch.randn(3, 6, 4, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(_WindowBias(lookup, sdpa=sdpa).double(), x, y)
    assert tape.methods == {"qkv": "exact", "<root>": "exact", "head": "exact"}
    with curvreg.GradNormTape(_WindowBias(lookup, minor=True, sdpa=sdpa).double()) as tape:
        out = tape.model(x)
    with pytest.raises(ValueError, match=r"not independent at op (indexing|F\.linear)"):
        tape.per_example_sq_grad_norms(ce(out, y))


def test_a_boolean_mask_lookup_is_a_function_of_parameters():
    """``table[mask][idx]`` is no lookup rule's, but a function of the table alone, which
    meets the windows' scores: exact, without the loop."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 6, 4, dtype=torch.double), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvreg.FallbackWarning)
        tape, _ = exact_against_loop(_WindowBias("mask").double(), x, y)
    assert tape.methods["<root>"] == "exact"


class _ParamChain(nn.Module):
    """Tokens [N, T, 4] through a linear layer, then combined with a function of parameters
    alone (``mode``): an MLP on a fixed coordinate table (Swin-V2's continuous position bias),
    a clamped and exponentiated scale, the same scale on windows merged with the batch
    ([N * 2, T / 2, 4]), a linear bias cloned with a part zeroed (torchvision Swin-V2), a scale
    whose parameter an elementwise rule also takes (``shared``). Cases the tape leaves to the
    per-example loop: the function also meets the data in an op no rule covers (``data``), its
    parameter is also so used (``also``), a function it was made from is (``upstream``)."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.lin, self.head = mode, nn.Linear(3, 4), nn.Linear(4, 3)
        if mode == "mlp":
            self.mlp = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))
            self.register_buffer("coords", torch.linspace(-1, 1, 8).reshape(4, 2))
        self.s = nn.Parameter(torch.randn(4) * 0.3)

    def forward(self, x):  # [N, 4, 3]
        mode, s = self.mode, self.s
        if mode == "bias":
            b = self.lin.bias.clone()
            b[1:3].zero_()
            h = F.linear(x, self.lin.weight, b)
        else:
            h = self.lin(x)
        scale = torch.clamp(s, max=1.0).exp()
        if mode == "mlp":
            h = h + 2 * torch.sigmoid(self.mlp(self.coords))  # [4, 4] against [N, 4, 4]
        if mode in ("mlp", "bias", "scale", "data", "also", "upstream"):
            h = h * (2 * scale if mode == "upstream" else scale)
        elif mode == "windows":
            h = (h.reshape(-1, 2, 4) * scale).reshape(h.shape)
        elif mode == "shared":
            h = h * scale + s
        if mode == "data":
            h = h + torch.lerp(h, 2 * h, scale)
        elif mode == "also":
            h = torch.lerp(h, 2 * h, s)
        elif mode == "upstream":
            h = h + torch.lerp(h, 2 * h, scale)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("mode", ["mlp", "scale", "windows", "bias", "shared", "data", "also",
                                  "upstream"])
def test_a_function_of_parameters_alone_meeting_the_batch_is_exact(mode):
    torch.manual_seed(0)
    model = _ParamChain(mode).double()
    x, y = torch.randn(3, 4, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, sq = exact_against_loop(model, x, y, quiet=True)
    assert torch.allclose(sq, vmap_sq_grad_norms(model, ce, x, y), rtol=1e-10)
    methods = set(tape.methods.values())
    assert methods == ({"exact", "fallback"} if mode in ("data", "also", "upstream") else {"exact"})
    if mode == "mlp":  # the MLP's layers are taken with the function, not by their rules
        assert not any(p.startswith("mlp") for p in tape.methods)


@pytest.mark.parametrize("mode", ["mlp", "windows", "shared"])
def test_a_function_of_parameters_alone_in_groups(mode):
    """group_size = 2: each group's gradient of the function's parameters is one
    vector-Jacobian product of the group's summed gradient at its expansion."""
    torch.manual_seed(0)
    model = _ParamChain(mode).double()
    x, y = torch.randn(4, 4, 3, dtype=torch.double), torch.tensor([0, 1, 2, 0])
    with curvreg.GradNormTape(model, group_size=2) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, x, y, group_size=2), rtol=1e-10)


def test_functions_of_parameters_under_the_other_estimators():
    """The probe and hybrid estimators compute a function's parameters exactly (it has no
    forward of its own to probe), the rest as usual: unbiased, and here nothing else is probed
    for the MLP's layers."""
    torch.manual_seed(0)
    model = _ParamChain("shared").double()
    x, y = torch.randn(3, 4, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    want = loop_sq_grad_norms(model, ce, x, y)
    for estimator in ("probe", "hybrid"):
        with curvreg.GradNormTape(model, estimator=estimator, num_probes=20000,
                                  generator=torch.Generator().manual_seed(0)) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
        assert torch.allclose(sq, want, rtol=0.05), (estimator, sq, want)


def test_a_function_of_parameters_returned_by_the_model():
    """Returned, and used by the loss: not taken as a function meeting the batch."""
    class Returned(_ParamChain):
        def forward(self, x):
            scale = self.s.exp()
            return self.head(torch.tanh(self.lin(x) * scale).mean(1)), scale

    torch.manual_seed(0)
    model = Returned("scale").double()
    x, y = torch.randn(3, 4, 3, dtype=torch.double), torch.tensor([0, 1, 2])

    def loss(out, t):
        return ce(out[0] * out[1].sum(), t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        with pytest.raises(ValueError, match=r"module '<root>' \(Returned\) produced an output "
                                             r"with dim 0 of size 4"):
            tape.per_example_sq_grad_norms(loss(out, y))


class _ExpandedShift(nn.Module):
    """A parameter expanded and combined with the tokens [N, T, 4]: a [d] one to [N, 1, d] and
    joined to them (``token``, CLIP's class embedding; ``scaled``, the same doubled first), a [d]
    one to [T, d] (``positions``) and a [1, d] one to [T, d] (``row``), both added to them. At
    T = N only the op that meets the batch (the join or the broadcasting sum) tells the two
    readings of the expansion's leading dim apart."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.p = mode, nn.Parameter(torch.randn(1, 4) if mode == "row" else torch.randn(4))
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):  # [N, T, 3]
        h = self.lin(x)
        if self.mode in ("token", "scaled"):
            token = self.p.expand(h.shape[0], 1, -1)
            h = torch.cat([2 * token if self.mode == "scaled" else token, h], 1)
        else:
            h = h + self.p.expand(h.shape[1], 4)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("t", [3, 5])  # T = N and T != N
@pytest.mark.parametrize("mode", ["token", "scaled", "positions", "row"])
def test_a_parameter_expanded_over_positions_or_the_batch(mode, t):
    torch.manual_seed(0)
    x, y = torch.randn(3, t, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(_ExpandedShift(mode).double(), x, y)
    assert tape.methods["<root>"] == "exact"


def test_torch_compile_refused():
    with pytest.raises(TypeError, match="torch.compile"):
        curvreg.GradNormTape(torch.compile(nn.Linear(3, 2)))


def test_inplace_relu_after_rule_layers_is_exact():
    # A rule layer's output is recorded as a gradient edge, so an in-place op on it afterwards
    # (nn.ReLU(inplace=True)) leaves delta = dL/d(layer output) intact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.double), torch.tensor([0, 2, 1])
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert torch.allclose(sq, ref, rtol=1e-10)
    ours = torch.autograd.grad(sq.sum(), list(model.parameters()))
    theirs = torch.autograd.grad(ref.sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-9) for a, b in zip(ours, theirs))


class _InputChangedAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        h.mul_(2)  # b's recorded input no longer holds the values b saw
        return out


def test_inplace_modification_rejected():
    model = _InputChangedAfter().double()
    x = torch.randn(3, 5, dtype=torch.double)
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(RuntimeError, match=r"an input of op F.linear in module 'b' was modified in place.*inplace=False"):
        tape.per_example_sq_grad_norms(ce(out, torch.zeros(3, dtype=torch.long)))
    # A module without a rule is re-run by the fallback, so its output is checked as well.
    model = nn.Sequential(nn.Linear(5, 4), nn.PReLU(4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(RuntimeError, match=r"an input or output of module '1' \(PReLU\) was modified in place"):
        tape.per_example_sq_grad_norms(ce(out, torch.zeros(3, dtype=torch.long)))


class _Child(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(3))  # its own parameters: its calls are recorded

    def forward(self, x, table, covered):
        return (F.linear(x, table) if covered else x @ torch.sin(table).t()) + self.bias


class _Parent(nn.Module):
    """Owns a table that its child uses (DeBERTa's shared relative embeddings)."""

    def __init__(self, covered):
        super().__init__()
        self.covered, self.table, self.child = covered, nn.Parameter(torch.randn(3, 4)), _Child()

    def forward(self, x):
        return self.child(x, self.table, self.covered)


def test_a_parameter_used_by_a_module_it_does_not_belong_to():
    x, y = torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    model = _Parent(covered=True).double()  # in an op a rule covers: exact
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, x, y), rtol=1e-12)
    model = _Parent(covered=False).double()
    with pytest.raises(ValueError, match=r"module 'child' uses parameter 'table', which belongs "
                                         r"to neither it nor its children, in torch\.sin"):
        with curvreg.GradNormTape(model) as tape:  # refused once the forward is settled
            out = model(x)
        tape.per_example_sq_grad_norms(ce(out, y))


class _RelativeKeys(nn.Module):
    """DeBERTa-style attention: relative embeddings owned by the parent, projected by this
    module's key layer (which also takes the tokens) and tiled over the batch by
    ``.repeat(N, 1, 1)`` against queries of shape [N * heads, T, d]."""

    def __init__(self):
        super().__init__()
        self.key, self.query = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, rel):  # x [N, T, 4], rel [5, 4]
        n, t, _ = x.shape
        q = self.query(x).view(n, t, 2, 2).transpose(1, 2).reshape(n * 2, t, 2)
        k = self.key(x).view(n, t, 2, 2).transpose(1, 2).reshape(n * 2, t, 2)
        pos = self.key(F.dropout(rel, 0.0)).view(5, 2, 2).transpose(0, 1).repeat(n, 1, 1)
        scores = q @ k.transpose(1, 2) + (q @ pos.transpose(1, 2))[..., :t]  # [N * 2, T, T]
        return (torch.softmax(scores, -1) @ k).view(n, 2, t, 2).transpose(1, 2).reshape(n, t, 4)


class _RelativeParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rel, self.attn, self.head = nn.Parameter(torch.randn(5, 4)), _RelativeKeys(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, self.rel).mean(1))


class _RelativeProduct(nn.Module):
    """DeBERTa(-v1)-style: relative keys [1, heads, 5, 2] from a table, met by a batched
    product ``q @ keys.transpose(-1, -2)`` with queries [N, heads, T, 2] (``flat``: queries
    [N, 4] and the keys as a matrix, a plain product: refused, the key layer's output having
    no example dimension)."""

    def __init__(self, flat=False):
        super().__init__()
        self.flat, self.rel, self.key = flat, nn.Parameter(torch.randn(5, 4)), nn.Linear(4, 4)
        self.query, self.head = nn.Linear(4, 4), nn.Linear(4 if flat else 10, 3)

    def forward(self, x):  # [N, T, 4]
        n, t, _ = x.shape
        keys = self.key(torch.tanh(self.rel))  # [5, 4], a function of parameters alone
        if self.flat:
            return self.head(self.query(x.mean(1)) @ keys.t() @ keys)
        q = self.query(x).view(n, t, 2, 2).transpose(1, 2)
        scores = q @ keys.view(1, 5, 2, 2).transpose(1, 2).transpose(-1, -2)  # [N, 2, T, 5]
        return self.head(torch.tanh(scores).mean(2).flatten(1))


@pytest.mark.parametrize("flat", [False, True])
def test_a_function_of_parameters_in_a_batched_product(flat):
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 4, dtype=torch.double), torch.tensor([0, 1, 2])
    exact_on_rules_or_refused(_RelativeProduct(flat).double(), x, y, flat and
                              r"op F\.linear in module 'key' produced an output with dim 0 of size 5")


class _EinsumBias(nn.Module):
    """MViTv2-style decomposed relative positions: ``table[dist]`` [3, 3, 2] contracted with the
    queries [N, 3, 2] by ``torch.einsum`` (``order``: which operand comes first; ``"ellipsis"``:
    an equation with ``...``, which is not rewritten)."""

    def __init__(self, order):
        super().__init__()
        self.order, self.table = order, nn.Parameter(torch.randn(5, 2))
        pos = torch.arange(3)
        self.register_buffer("dist", pos[:, None] - pos[None, :] + 2)
        self.lin, self.head = nn.Linear(2, 2), nn.Linear(9, 3)

    def forward(self, x):  # [N, 3, 2]
        q, rel = self.lin(x), self.table[self.dist]
        if self.order == "first":
            r = torch.einsum("bhc,hkc->bhk", q, rel)
        elif self.order == "second":
            r = torch.einsum("hkc,bhc->bhk", rel, q)
        else:
            r = torch.einsum("...hc,hkc->...hk", q, rel)
        return self.head(torch.tanh(r).flatten(1))


@pytest.mark.parametrize("order", ["first", "second", "ellipsis"])
def test_an_unbatched_table_contracted_by_einsum(order):
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 2, dtype=torch.double), torch.tensor([0, 1, 2, 0])
    exact_on_rules_or_refused(_EinsumBias(order).double(), x, y, order == "ellipsis" and
                              r"op indexing in module '<root>' produced an output with dim 0 of size 3")


def test_relative_embeddings_a_parent_owns_projected_and_tiled_over_the_batch():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 4, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(_RelativeParent().double(), x, y)
    assert set(tape.methods.values()) == {"exact"}


class _HandLinear(nn.Module):
    """A linear layer written with a matmul on the transposed weight (Falcon's FalconLinear)."""

    def __init__(self, spelling, other_use=None):
        super().__init__()
        self.spelling, self.other_use = spelling, other_use
        self.weight, self.bias = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        w = self.weight
        wt = {"T": lambda: w.T, "t": lambda: w.t(), "mT": lambda: w.mT,
              "transpose": lambda: w.transpose(0, 1), "transpose_neg": lambda: w.transpose(-1, -2),
              }[self.spelling]()
        y = {"T": x.__matmul__, "t": lambda m: torch.matmul(x, m), "mT": x.matmul,
             "transpose": x.__matmul__, "transpose_neg": x.__matmul__}[self.spelling](wt)
        if self.other_use:
            y = y + torch.sin(wt).sum() * 0.1
        return y + self.bias


@pytest.mark.parametrize("spelling", ["T", "t", "mT", "transpose", "transpose_neg"])
@pytest.mark.parametrize("positions", [False, True])
def test_a_matmul_with_a_transposed_weight_takes_the_linear_rule(spelling, positions):
    torch.manual_seed(0)
    model = nn.Sequential(_HandLinear(spelling), nn.Tanh(), nn.Flatten(), nn.Linear(6 if positions else 3, 2)).double()
    x = torch.randn(*((5, 2, 4) if positions else (5, 4)), dtype=torch.double)
    tape, _ = exact_against_loop(model, x, torch.tensor([0, 1, 1, 0, 1]), rtol=1e-12)
    assert tape.methods["0"] == "exact"


class _TransposeOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):  # W.T in an op no rule covers: an ordinary use, the loop takes it
        return x * torch.sin(self.weight.T).sum(1)


def test_a_transposed_weight_used_elsewhere_too():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 1, 0, 1])
    model = nn.Sequential(_TransposeOnly(), nn.Tanh(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert tape.methods["0"] == "fallback"
    assert torch.allclose(sq, loop_sq_grad_norms(model, ce, x, y), rtol=1e-12)
    model = nn.Sequential(_HandLinear("T", other_use=True), nn.Tanh(), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is used through its transpose both "
                                         r"in a matmul \(taken as F\.linear\) and in another op"):
        with curvreg.GradNormTape(model) as tape:
            model(x)


class _JoinedBias(nn.Module):
    """BEiT/EVA-style attention input: q, k, v biases (k's a zero buffer) joined by torch.cat
    into one bias of F.linear (``use="linear"``; keyword arguments: ``"keywords"``) or of a
    sum with the projection (``"sum"``), also used in an op no rule covers (``"also"``), or
    only there (``"only"``)."""

    def __init__(self, use):
        super().__init__()
        self.use, self.lin = use, nn.Linear(4, 6, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.register_buffer("k_bias", torch.zeros(2))

    def forward(self, x):  # [N, T, 4]
        b = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        w = self.lin.weight
        if self.use in ("linear", "also"):
            y = F.linear(x, w, b)
        elif self.use == "keywords":
            y = F.linear(x, weight=w, bias=b)
        elif self.use == "sum":
            y = b + self.lin(x)
        else:  # "only"
            y = self.lin(x) * torch.sigmoid(b)
        return y + torch.sin(b).sum() if self.use == "also" else y


@pytest.mark.parametrize("use", ["linear", "keywords", "sum", "only"])
def test_biases_joined_by_cat_take_the_elementwise_rule_piece_by_piece(use):
    torch.manual_seed(0)
    model = nn.Sequential(_JoinedBias(use), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.double), torch.tensor([0, 1, 1, 0, 1])
    tape, _ = exact_against_loop(model, x, y, rtol=1e-12, quiet=True)
    assert tape.methods["0"] == ("fallback" if use == "only" else "exact")
    with curvreg.GradNormTape(model) as tape:  # the values are the model's
        out = model(x)
    assert torch.allclose(out, model(x), rtol=1e-14, atol=0)


def test_biases_joined_by_cat_used_both_ways_refused():
    model = nn.Sequential(_JoinedBias("also"), nn.Flatten(), nn.Linear(18, 2)).double()
    with pytest.raises(ValueError, match=r"parameters '0\.q_bias', '0\.v_bias' are joined by "
                                         r"torch\.cat into one tensor used both as a bias"):
        with curvreg.GradNormTape(model):
            model(torch.randn(5, 3, 4, dtype=torch.double))


def test_parameter_used_outside_modules_rejected():
    model, x, y = build("mlp", n=3)
    with curvreg.GradNormTape(model) as tape:
        out = model(x) + (model[0].bias * 0.1).sum()
    with pytest.raises(ValueError, match="'0.bias' is used outside"):
        tape.per_example_sq_grad_norms(ce(out, y))


class _Merge(nn.Module):
    """[N, 2, 3] -> [N, 4] through rows [2N, ...] that merge examples with positions
    (example-major, or example-minor with ``minor``), with a row norm on the merged rows."""

    def __init__(self, minor, norm=None):
        super().__init__()
        self.minor, self.lin = minor, nn.Linear(3, 2)
        self.norm = {None: nn.Identity, "layer": nn.LayerNorm, "rms": nn.RMSNorm,
                     "batch": nn.BatchNorm1d}[norm](2)
        if norm == "batch":  # eval mode, running statistics: an affine map per row
            self.norm.eval()
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = (x.transpose(0, 1) if self.minor else x).flatten(0, 1)  # [2N, 3]
        h = torch.tanh(self.norm(self.lin(h))).reshape(*(2, -1, 2) if self.minor else (-1, 2, 2))
        return (h.transpose(0, 1) if self.minor else h).flatten(1)


@pytest.mark.parametrize("norm", [None, "layer", "rms", "batch"])
def test_merged_batch_dim_example_major_is_exact_example_minor_refused(norm):
    x, y = torch.randn(4, 2, 3, dtype=torch.double), torch.tensor([0, 1, 2, 3])
    model = _Merge(minor=False, norm=norm).double()
    if norm is not None:
        with torch.no_grad():
            for p in model.norm.parameters():
                p.normal_()
    exact_against_loop(model, x, y, rtol=1e-12)
    model = _Merge(minor=True, norm=norm).double()
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    with pytest.raises(ValueError, match=r"not independent at op F\.(linear|layer_norm|rms_norm|batch_norm)"):
        tape.per_example_sq_grad_norms(ce(out, y))
    # a convolution (not position-wise) on the merged rows: each example's rows are a group
    conv = nn.Sequential(nn.Flatten(0, 1), nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2),
                         nn.Flatten(1)).double()

    def losses(model, x):
        return model(x).reshape(4, -1).sin().sum(1)

    with curvreg.GradNormTape(conv) as tape:
        sq = tape.per_example_sq_grad_norms(losses(conv, x))
    want = torch.stack([sum(g.pow(2).sum() for g in torch.autograd.grad(
        losses(conv, x)[i], list(conv.parameters()))) for i in range(4)])
    assert torch.allclose(sq, want, rtol=1e-12)
    minor = nn.Sequential(_Transpose01(), conv).double()  # example-minor rows: refused
    with curvreg.GradNormTape(minor) as tape:
        out = minor(x).reshape(2, 4, -1).transpose(0, 1).sin().sum((1, 2))
    with pytest.raises(ValueError, match=r"not independent at op F\.conv1d"):
        tape.per_example_sq_grad_norms(out)


class _Transpose01(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


def test_group_size_validation():
    model, x, y = build("mlp", n=5)
    with pytest.raises(ValueError, match="group_size"):
        curvreg.GradNormTape(model, group_size=0)
    with curvreg.GradNormTape(model, group_size=2) as tape:
        out = model(x)
    with pytest.raises(ValueError, match="does not divide the batch size 5"):
        tape.per_example_sq_grad_norms(ce(out, y))


def test_embedding_scale_grad_by_freq_rejected():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2))
    idx = torch.randint(0, 5, (3, 2))
    with curvreg.GradNormTape(model) as tape:
        out = model(idx)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        tape.per_example_sq_grad_norms(out.sum(1))


def test_custom_rule_extends_mapping_and_override_guard():
    class MyLinear(nn.Linear):
        pass

    calls = []

    def grads(layer, inputs, grad_output, names, group):
        calls.append(names)
        return curvreg.default_rules()[nn.Linear].grads(layer, inputs, grad_output, names, group)

    model = nn.Sequential(MyLinear(5, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.double), torch.zeros(4, dtype=torch.long)
    with curvreg.GradNormTape(model, rules={MyLinear: LayerRule(grads=grads)}) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert calls == [["bias", "weight"]]
    expected = (F.softmax(out, 1) - F.one_hot(y, 3)).pow(2).sum(1) * (x.pow(2).sum(1) + 1)
    assert torch.allclose(sq, expected)
    with pytest.raises(ValueError, match="allow_override"):
        curvreg.GradNormTape(model, rules={nn.Linear: LayerRule(grads=grads)})
    with pytest.raises(TypeError, match="LayerRule"):
        curvreg.GradNormTape(model, rules={MyLinear: grads})


def test_non_module_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        curvreg.GradNormTape(lambda x: x)


class _ViewAndOther(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):  # the same parameter through a covered view and an uncovered op
        return self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1)) * self.gamma.exp().sum()


def test_parameter_view_and_uncovered_use_in_one_module_refused():
    model = nn.Sequential(_ViewAndOther(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    with pytest.raises(ValueError, match=r"module '0' \(_ViewAndOther\) uses a parameter both "
                                         r"through a reshaped view"):
        with curvreg.GradNormTape(model):
            model(torch.randn(2, 3, 8, 8, dtype=torch.double))


class _ViewUses(nn.Module):
    """A per-channel parameter through a reshaped view: consumed by a rule, returned, or both."""

    def __init__(self, mode):
        super().__init__()
        self.conv, self.t, self.mode = nn.Conv2d(3, 4, 3), nn.Parameter(torch.rand(4) + 0.5), mode

    def forward(self, x):
        v, h = self.t.view(1, -1, 1, 1), self.conv(x)
        if self.mode == "returned":
            return h.mean((2, 3)), v
        if self.mode == "both":
            return (h * v).mean((2, 3)), v
        return (h * torch.exp(v)).mean((2, 3)), None  # "uncovered": the loop, exact


@pytest.mark.parametrize("mode, refusal", [
    ("returned", r"module '<root>' \(_ViewUses\) produced an output with dim 0 of size 1"),
    ("both", r"parameter 't' is used through a reshaped view that an elementwise rule consumes "
             r"and that is also used elsewhere"),
    ("uncovered", None),
])
def test_parameter_view_used_outside_its_rule(mode, refusal):
    """The view's whole gradient must be accounted for: one that leaves the module (and is used
    by the loss) is never silently dropped."""
    torch.manual_seed(0)
    model = _ViewUses(mode).double()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.double), torch.randint(0, 4, (5,))

    def loss(out, t):
        logits = out[0] * out[1].view(1, -1) if mode != "uncovered" else out[0]
        return F.cross_entropy(logits, t, reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        if refusal is None:
            sq = tape.per_example_sq_grad_norms(loss(out, y))
            assert torch.allclose(sq, loop_sq_grad_norms(model, loss, x, y), rtol=1e-10)
            return
        with pytest.raises(ValueError, match=refusal):
            tape.per_example_sq_grad_norms(loss(out, y))


class _ShiftedScale(nn.Module):
    """A Gemma-style scale: tokens times a view of a per-channel parameter (``1 + w.float()``
    and other casts, shifts and reshapes), the view's parent used elsewhere too (``parent``),
    modified in place (``inplace``), or negated (``1 - w``: not the parameter itself but a
    function of it alone, taken where it meets the batch)."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.lin, self.w = mode, nn.Linear(3, 4), nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x):  # [N, T, 3]
        w, h = self.w, self.lin(x)
        parent = w.float() if self.mode == "parent" else None
        scale = {"gemma": lambda: 1.0 + w.float(), "shift": lambda: (w.view(1, 4) + 1).to(x.dtype),
                 "sub": lambda: (w - 1).reshape(1, 1, 4), "negated": lambda: 1 - w,
                 "parent": lambda: 1.0 + parent, "inplace": lambda: (1.0 + w).mul_(2)}[self.mode]()
        out = (h * scale.to(h.dtype)).mean(1)
        return (out, parent) if self.mode == "parent" else out


@pytest.mark.parametrize("mode", ["gemma", "shift", "sub", "negated"])
def test_a_parameter_through_casts_and_shifts_takes_the_elementwise_rule(mode):
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(_ShiftedScale(mode).double(), x, y, quiet=True,
                                 rtol=1e-6 if mode == "gemma" else 1e-10)  # float32 scale
    assert tape.methods["<root>"] == "exact"


@pytest.mark.parametrize("mode, refusal", [
    ("parent", r"parameter 'w' is used through a reshaped view that an elementwise rule consumes "
               r"and that is also used elsewhere"),
    ("inplace", r"module '<root>' modifies a view of parameter 'w' in place \(torch\.Tensor\.mul_\)"),
])
def test_a_parameter_view_used_twice_or_modified_in_place_refused(mode, refusal):
    x, y = torch.randn(3, 5, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    model = _ShiftedScale(mode).double()
    with pytest.raises(ValueError, match=refusal):
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        if mode == "parent":  # the parent view leaves the module and is used by the loss
            out = out[0] * out[1].sum().double()
        tape.per_example_sq_grad_norms(ce(out, y))


@pytest.mark.parametrize("estimator", ["exact", "probe", "hybrid"])
def test_an_empty_batch_gives_empty_norms_and_a_no_op_backward(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with curvreg.GradNormTape(model, estimator=estimator) as tape:
        out = model(torch.randn(0, 2, 6, 6))
    losses = F.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="none")
    sq = tape.per_example_sq_grad_norms(losses)
    assert sq.shape == (0,) and sq.requires_grad
    (losses.sum() + sq.sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_the_independence_check_is_not_fooled_by_a_diverged_model():
    # A model whose weights became NaN (a diverged run) must not be reported as mixing
    # examples: the check cannot conclude, so it passes and runs again on the next call.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with curvreg.GradNormTape(model, check_independence="always") as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))
    assert sq.shape == (5,) and not torch.isfinite(sq).all()


class _AddCMul(nn.Module):
    """torch.addcmul with parameters: ConvNeXt-V2's global response norm (``grn``: views of a
    shift and a scale, the scale times data), a scale with a value (``scaled``), a shift alone
    (``shift``), the method form with the scale second (``method``), each with the other
    parameter as a plain scale or shift, and both factors parameters (``both``: not rewritten,
    the loop takes it)."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.lin = mode, nn.Linear(3, 4)
        self.w, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x):  # [N, T, 3]
        h = torch.tanh(self.lin(x))
        if self.mode == "grn":
            n = h / (h.norm(dim=1, keepdim=True).mean(-1, keepdim=True) + 1e-6)
            h = h + torch.addcmul(self.b.view(1, 1, 4), self.w.view(1, 1, 4), h * n)
        elif self.mode == "scaled":
            h = torch.addcmul(h, self.w, h, value=0.5) * self.b
        elif self.mode == "shift":
            h = torch.addcmul(self.b, h, h) * self.w
        elif self.mode == "method":
            h = h.addcmul(h.exp(), self.w) + self.b
        else:
            h = torch.addcmul(h, self.w, self.b)
        return torch.tanh(h).mean(1)


@pytest.mark.parametrize("mode", ["grn", "scaled", "shift", "method", "both"])
def test_addcmul_with_parameters_takes_the_elementwise_rules(mode):
    torch.manual_seed(0)
    model = _AddCMul(mode).double()
    x, y = torch.randn(3, 5, 3, dtype=torch.double), torch.tensor([0, 1, 2])
    tape, _ = exact_against_loop(model, x, y, quiet=True)
    with curvreg.GradNormTape(model):
        taped = model(x)
    assert torch.allclose(taped, model(x), rtol=1e-14, atol=0)  # the model's values unchanged
    assert tape.methods["<root>"] == ("fallback" if mode == "both" else "exact")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_weight_under_a_parametrization_refused_and_exact_once_removed(kind):
    """weight_norm (torch.nn.utils.parametrize) computes the layer's weight from parameters
    alone: refused with a message that names the module and the way out, which is exact."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
        x = torch.randn(3, 3, dtype=torch.double)
    else:
        model = nn.Sequential(weight_norm(nn.Conv1d(2, 4, 3), dim=2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(16, 3)).double()
        x = torch.randn(3, 2, 6, dtype=torch.double)
    y = torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model) as tape:
            out = model(x)
        with pytest.raises(ValueError, match=r"module '0\.parametrizations\.weight' "
                                             r"\(ParametrizationList\) computes a parameter from "
                                             r"parameters alone.*remove_parametrizations"):
            tape.per_example_sq_grad_norms(ce(out, y))
    parametrize.remove_parametrizations(model[0], "weight")
    tape, _ = exact_against_loop(model, x, y)
    assert tape.methods["0"] == "exact"



def test_a_freed_input_tensors_id_reused_by_a_constant_is_no_taint():
    """Tensors made from the model's inputs are tainted (not constants of the model) by id; a
    constant that gets a freed tainted tensor's id (CPython reuses the memory) is not one."""
    model = _TokPos().double()
    ids = torch.randint(0, 9, (5, 5))
    with curvreg.GradNormTape(model) as tape:
        model(ids)
    rec = tape.recording
    mask = ids > 0
    rec._taint([mask])
    assert rec._tainted(mask) and not rec._batch_free((mask,), {})
    freed, kept = id(mask), []
    del mask
    for _ in range(10000):
        u = torch.zeros(5, 5, dtype=torch.bool)
        if id(u) == freed:
            break
        kept.append(u)  # hold it, so that the next tensor takes other memory
    else:
        pytest.skip("no tensor took the freed tensor's id")
    assert not rec._tainted(u) and rec._batch_free((u,), {})
