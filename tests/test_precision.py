"""Mixed precision (CPU bf16 autocast): the tape's rule arithmetic runs in float32 on promoted
inputs and deltas, so the norms under autocast stay close to the float32 ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg

TOL = 3e-2  # bf16 keeps 8 bits of mantissa: the forward's activations differ at ~0.4% each


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    seq = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Flatten(), nn.Linear(32 * 6, 10))
    return {"mlp": (mlp, torch.randn(16, 32)), "cnn": (cnn, torch.randn(16, 3, 12, 12)),
            "seq": (seq, torch.randn(16, 6, 16))}


def sq_and_grad(model, x, y, bf16):
    with curvreg.GradNormTape(model) as tape, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    losses = F.cross_entropy(out.float(), y, reduction="none")
    sq = tape.per_example_sq_grad_norms(losses)
    grad = torch.autograd.grad(sq.mean(), [p for p in model.parameters()])
    return sq, torch.cat([g.flatten().float() for g in grad]), out


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
def test_bf16_autocast_norms_close_to_float32(name):
    model, x = models()[name]
    y = torch.randint(0, 10, (x.shape[0],))
    ref, ref_grad, _ = sq_and_grad(model, x, y, bf16=False)
    sq, grad, out = sq_and_grad(model, x, y, bf16=True)
    assert out.dtype == torch.bfloat16  # the forward did run in bf16
    assert sq.dtype == torch.float32
    assert ((sq - ref).norm() / ref.norm()).item() < TOL
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 3 * TOL
