"""A model written by hand (functional ops, a parameter used through ``x @ W``, a learned scale
applied elementwise) under the tape: which rule took each module, the per-example norms checked
against a batch-size-1 loop, and what a refusal looks like.

    python examples/custom_model.py
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import curvreg


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)   # used as x @ w
        self.scale = nn.Parameter(torch.ones(d))               # used elementwise
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.scale * F.gelu(self.norm(x) @ self.w)


class Net(nn.Module):
    def __init__(self, d: int = 16, classes: int = 5):
        super().__init__()
        self.embed, self.blocks = nn.Linear(8, d), nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class Tied(Net):
    """The output layer reuses the embedding's weight (weight tying): no rule sees both uses, so
    the tape warns and computes that module's norms with its exact per-example loop fallback."""

    def forward(self, x):
        return self.blocks(self.embed(x)) @ self.embed.weight[:, :5]


def main():
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    errors = {}
    for model in (Net().double(), Tied().double()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", curvreg.FallbackWarning)
            obj = curvreg.penalized_objective(model, x, y, 0.1)
        name = type(model).__name__
        ref = curvreg.reference.loop_sq_grad_norms(model, curvreg.objective.cross_entropy, x, y)
        errors[name] = (obj.sq_norms - ref).abs().max().item()  # against one backward per example
        print(f"{name}: " + ", ".join(f"{p or '<root>'} {m}" for p, m in sorted(obj.tape.methods.items())))
        for w in caught:
            print(f"  warning: {str(w.message).splitlines()[0][:110]}")
        print(f"  max |tape - loop| over the batch: {errors[name]:.2e}")
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    try:  # training-mode BatchNorm couples the examples: the tape asks what to do
        curvreg.penalized_objective(bn, x, y, 0.1)
    except ValueError as e:
        print(f"refused: {str(e)[:300]}")
    return errors


if __name__ == "__main__":
    main()
