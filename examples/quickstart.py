"""Curvature regularization on your own model, in a few lines: a small CNN with training-mode
BatchNorm trained on random data for a few steps, printing the loss and the penalty
R = mean_i ||grad l_i||^2. Swap in your model and data loader. ``penalized_objective`` wraps the
three lines of the README's tape example (open a GradNormTape over the forward, per-example
losses, ``tape.per_example_sq_grad_norms``).

    python examples/quickstart.py
"""
import torch
from torch import nn

import curvreg


def main(steps: int = 5, alpha: float = 1e-3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)  # probes for the BatchNorm estimate: reproducible
    for step in range(steps):
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        # mean_i l_i + alpha * mean_i ||grad l_i||^2. Training-mode BatchNorm couples the
        # examples: batch_norm="unbiased" estimates the true norms without bias.
        obj = curvreg.penalized_objective(model, x, y, alpha, batch_norm="unbiased", generator=gen)
        opt.zero_grad()
        obj.value.backward()                                  # double backprop
        opt.step()
        print(f"step {step}: loss {obj.losses.mean().item():.4f}  R {obj.sq_norms.mean().item():.4g}  "
              f"methods {sorted(set(obj.tape.methods.values()))}")


if __name__ == "__main__":
    main()
