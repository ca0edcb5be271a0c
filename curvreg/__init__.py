"""curvreg: curvature regularization with exact, differentiable per-example gradient norms.

Conventions: g_i = grad of loss_i (not divided by N); R = mean_i ||g_i||^2. See ``curvreg.tape``.
"""
from .rules import LayerRule, default_rules
from .tape import FallbackWarning, GradNormTape

__all__ = [
    # core
    "GradNormTape", "LayerRule", "default_rules", "FallbackWarning",
]
__version__ = "0.1.0"
