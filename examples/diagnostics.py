"""Sharpness of a model in four numbers: tr(H) (Hutchinson, with a standard error), the
empirical Fisher trace tr(F_bar) = mean_i ||grad l_i||^2 (the penalty, exact), the Fisher trace
tr(F) (labels drawn from the model, summed exactly over classes here) and the top Hessian
eigenvalues (Lanczos), for a small MLP fitted to random data.

    python examples/diagnostics.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import curvreg


def per_example_ce(output, target):
    return F.cross_entropy(output, target, reduction="none")


def main(steps: int = 200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x, y = torch.randn(256, 10, dtype=torch.float64), torch.randint(0, 3, (256,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    gen = torch.Generator().manual_seed(0)
    h = curvreg.hessian_trace(model, per_example_ce, batches, num_probes=200, generator=gen)
    fbar = curvreg.empirical_fisher_trace(model, per_example_ce, batches)
    f = curvreg.fisher_trace(model, batches, labels="all")
    eig = curvreg.top_hessian_eigenvalues(model, per_example_ce, batches, k=3, generator=gen)
    print(f"tr(H)      {h.value:.4f} +- {h.stderr:.4f}  ({h.num_probes} Hutchinson probes)")
    print(f"tr(F_bar)  {float(fbar):.4f}  (exact: the curvature penalty R)")
    print(f"tr(F)      {float(f):.4f}  (exact sum over the 3 labels)")
    print(f"lambda_max {', '.join(f'{v:.4f}' for v in eig.eigenvalues)}  (converged: {eig.converged})")
    return model, batches, (h, fbar, f, eig)


if __name__ == "__main__":
    main()
