"""curvreg: curvature regularization with exact, differentiable per-example gradient norms.

Conventions: g_i = grad of loss_i (not divided by N); R = mean_i ||g_i||^2. See ``curvreg.tape``.
"""
from . import reference
from .rules import LayerRule, default_rules
from .tape import FallbackWarning, GradNormTape
from .objective import Objective, penalized_objective
from .diagnostics import (TraceEstimate, hessian_quadratic_form, empirical_fisher_trace, fisher_trace, hessian_trace,
                          hessian_vector_product, hutchinson_trace, hutchpp_trace, model_mode,
                          SpectralDensity, hessian_spectral_density, top_hessian_eigenvalues)

__all__ = [
    # core
    "GradNormTape", "LayerRule", "default_rules", "FallbackWarning", "penalized_objective", "Objective",
    # brute-force references (a batch-size-1 loop, torch.func)
    "reference",
    # diagnostics
    "hessian_vector_product", "hessian_quadratic_form", "hessian_trace", "top_hessian_eigenvalues", "empirical_fisher_trace",
    "fisher_trace", "hutchinson_trace", "hutchpp_trace", "TraceEstimate", "model_mode",
    "hessian_spectral_density", "SpectralDensity",
]
__version__ = "0.1.0"
