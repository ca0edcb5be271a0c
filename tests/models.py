"""Small float64 models covering every layer rule and option; cases as data."""
from __future__ import annotations

import torch
import torch.func
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Pool(nn.Module):
    """Mean over every dim after the first two -> [N, C] (no parameters)."""

    def forward(self, x):
        return x.flatten(2).mean(2) if x.dim() > 2 else x


class SeqPool(nn.Module):
    def forward(self, x):  # [N, T, d] -> [N, d]
        return x.mean(1)


class Scale(nn.Module):
    """A custom module with direct parameters: the scale meets the data in ``torch.lerp`` (no
    op rule, so the fallback), the shift is an elementwise op rule."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(-0.5, 0.5, d))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, d))

    def forward(self, x):
        return torch.tanh(torch.lerp(x, 2 * x, self.scale) + self.shift)


class LayerScale(nn.Module):
    """Elementwise scale and shift by broadcast parameters (op rules, no fallback)."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.pos = nn.Parameter(torch.linspace(-0.2, 0.3, 2 * d).reshape(1, 2, d))

    def forward(self, x):  # [N, 2, d]
        return torch.tanh(self.gamma * x + self.pos)


class TiedLM(nn.Module):
    """Embedding whose weight is reused as the output projection (weight tying)."""

    def __init__(self, vocab=7, d=4, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mix = nn.Linear(d, d)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.emb(idx)))   # [N, T, d]
        return F.linear(h.mean(1), self.emb.weight)  # [N, vocab]


class Recurrent(nn.Module):
    """One Linear applied three times (recurrent use)."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.cell = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h) + h)
        return self.out(h)


class SharedPair(nn.Module):
    """Two Linear modules holding the same weight Parameter, plus a residual branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h + torch.tanh(self.b(h)))


class Attn(nn.Module):
    """Self-attention: nn.MultiheadAttention runs as rule ops (curvreg.attention)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [N, T, 3]
        h = self.inp(x)
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(1))


class CrossAttn(Attn):
    """Cross-attention (keys from another projection): PyTorch's opaque function, so the
    exact per-example loop fallback."""

    def __init__(self):
        super().__init__()
        self.kv = nn.Linear(3, 4)

    def forward(self, x):
        h, m = self.inp(x), self.kv(x)
        with sdpa_kernel(SDPBackend.MATH):
            a, _ = self.attn(h, m, m, need_weights=False)
        return self.head(a.mean(1))


class TransposedWeights(nn.Module):
    """Weights stored [in, out] and applied as ``torch.addmm(b, x, W)`` (GPT-2's Conv1D, on
    examples merged with positions) and ``x @ W`` (on [N, T, d])."""

    def __init__(self, d_in=3, d=4, classes=3):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d_in, d) / 2), nn.Parameter(torch.randn(d) / 4)
        self.w2 = nn.Parameter(torch.randn(d, classes) / 2)

    def forward(self, x):  # [N, T, d_in]
        n, t, _ = x.shape
        h = torch.tanh(torch.addmm(self.b1, x.reshape(-1, x.shape[-1]), self.w1)).view(n, t, -1)
        return (h @ self.w2).mean(1)


class ViewScale(nn.Module):
    """A per-channel parameter applied through reshaped views (timm ConvNeXt's layer scale
    ``x.mul(gamma.reshape(1, -1, 1, 1))``), twice: as a scale and as a shift."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1)) + self.gamma.view(1, -1, 1, 1)


def _seq(*layers):
    return nn.Sequential(*layers)


def _frozen(model, names):
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return model


def _eval_bn():
    m = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), Pool(), nn.Linear(4, 3))
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def img(c=3, s=8):
    return lambda n: torch.randn(n, c, s, s)


def vec(d=5):
    return lambda n: torch.randn(n, d)


def seq(t, d):
    return lambda n: torch.randn(n, t, d)


def tokens(vocab, t, padding_idx=None):
    def make(n):
        idx = torch.randint(0, vocab, (n, t))
        idx[:, 1] = idx[:, 0]  # guaranteed repeated tokens
        if padding_idx is not None:
            idx[:, -1] = padding_idx
        return idx
    return make


# id -> (model builder, input maker). Every model maps its input to [N, 3] or [N, vocab] logits.
CASES = {
    "mlp": (lambda: _seq(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), vec()),
    "mlp_gelu_nobias": (lambda: _seq(nn.Linear(5, 6, bias=False), nn.GELU(), nn.Linear(6, 3)), vec()),
    "linear_seq_gram": (lambda: _seq(nn.Linear(8, 8), nn.Tanh(), SeqPool(), nn.Linear(8, 3)), seq(2, 8)),
    "linear_seq_materialize": (lambda: _seq(nn.Linear(3, 2), nn.Tanh(), SeqPool(), nn.Linear(2, 3)), seq(6, 3)),
    "linear_rank4": (lambda: _seq(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(1, 2), SeqPool(), nn.Linear(5, 3)),
                     lambda n: torch.randn(n, 2, 3, 4)),
    "conv1d_stride_dilation": (lambda: _seq(nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1), nn.Tanh(),
                                            Pool(), nn.Linear(4, 3)), lambda n: torch.randn(n, 3, 11)),
    "conv2d_stride_pad": (lambda: _seq(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(), Pool(),
                                       nn.Linear(4, 3)), img()),
    "conv2d_same_groups_nobias": (lambda: _seq(nn.Conv2d(4, 6, 3, padding="same", groups=2, bias=False),
                                               nn.Tanh(), Pool(), nn.Linear(6, 3)), img(4)),
    "conv2d_same_even_kernel_dilation": (lambda: _seq(nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(2, 1)),
                                                      nn.Tanh(), Pool(), nn.Linear(4, 3)), img()),
    "conv2d_reflect_circular": (lambda: _seq(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                                             nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular"),
                                             Pool(), nn.Linear(4, 3)), img()),
    "conv2d_gram_small_map": (lambda: _seq(nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(), Pool(), nn.Linear(16, 3)),
                              img(8, 5)),
    "conv2d_depthwise": (lambda: _seq(nn.Conv2d(4, 8, 3, groups=4), nn.Tanh(), Pool(), nn.Linear(8, 3)), img(4)),
    "conv3d": (lambda: _seq(nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(1, 0, 1)), nn.Tanh(),
                            Pool(), nn.Linear(3, 3)), lambda n: torch.randn(n, 2, 3, 5, 4)),
    "embedding_padding_idx": (lambda: _seq(nn.Embedding(20, 4, padding_idx=0), nn.Tanh(), SeqPool(),
                                           nn.Linear(4, 3)), tokens(20, 4, padding_idx=0)),
    "embedding_materialize": (lambda: _seq(nn.Embedding(5, 3), SeqPool(), nn.Linear(3, 3)), tokens(5, 6)),
    "layernorm_groupnorm": (lambda: _seq(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), Pool(),
                                         nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)), img()),
    "layernorm_seq": (lambda: _seq(nn.Linear(3, 4), nn.LayerNorm(4), SeqPool(), nn.Linear(4, 3)), seq(3, 3)),
    "batchnorm_eval": (_eval_bn, img()),
    "instancenorm_affine": (lambda: _seq(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Tanh(),
                                         Pool(), nn.Linear(4, 3)), img()),
    "tied_embedding": (lambda: TiedLM(padding_idx=0), tokens(7, 3, padding_idx=0)),
    "recurrent": (Recurrent, vec()),
    "shared_pair": (SharedPair, vec()),
    "frozen": (lambda: _frozen(_seq(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), {"0.weight", "2.bias"}), vec()),
    "fallback_custom": (lambda: _seq(nn.Linear(5, 4), Scale(4), nn.Linear(4, 3)), vec()),
    "elementwise_scale_shift": (lambda: _seq(nn.Linear(3, 4), LayerScale(4), SeqPool(), nn.Linear(4, 3)),
                                seq(2, 3)),
    "fallback_prelu_subclass": (lambda: _seq(nn.Linear(5, 4), nn.PReLU(4), nn.Linear(4, 3)), vec()),
    "attention": (Attn, seq(3, 3)),
    "fallback_attention": (CrossAttn, seq(3, 3)),
    "transposed_weights": (TransposedWeights, seq(3, 3)),
    "transposed_weights_inner": (lambda: _seq(nn.Linear(3, 3), TransposedWeights()), seq(3, 3)),
    "parameter_views": (lambda: _seq(ViewScale(), nn.Tanh(), Pool(), nn.Linear(4, 3)), img()),
}


def build(case: str, n: int, seed: int = 0):
    """Model (float64), inputs and integer targets for ``case``."""
    torch.manual_seed(seed)
    make_model, make_input = CASES[case]
    model = make_model().double()
    x = make_input(n)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        classes = model(x).shape[1]
    y = torch.randint(0, classes, (n,))
    return model, x, y


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def node_names(root):
    """Type names of every autograd node reachable from ``root`` (a grad_fn)."""
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def dense_hessian(model, x, y):
    """The dense Hessian of the mean cross-entropy over the parameters that require grad
    (torch.func.hessian), in ``model.parameters()`` order."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in trained])

    def loss(v):
        chunks = v.split([p.numel() for _, p in trained])
        params = {n: c.view_as(p) for (n, p), c in zip(trained, chunks)}
        return ce(torch.func.functional_call(model, params, (x,)), y).mean()

    return torch.func.hessian(loss)(flat)
