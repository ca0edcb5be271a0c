"""Sharpness diagnostics: HVPs, trace estimators with error bars, Fisher traces, eigenvalues.

Objective: L(theta) = mean of l_i over every example in ``batches`` (accumulated batch by batch).
"""
from .common import model_mode
from .hessian import (hessian_quadratic_form, hessian_trace, hessian_vector_product,
                      top_hessian_eigenvalues)
from .fisher import empirical_fisher_trace, fisher_trace
from .spectrum import SpectralDensity, hessian_spectral_density, lanczos
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = ["hessian_vector_product", "hessian_quadratic_form", "hessian_trace", "top_hessian_eigenvalues", "model_mode",
           "empirical_fisher_trace", "fisher_trace", "TraceEstimate", "hutchinson_trace",
           "hutchpp_trace", "hessian_spectral_density", "SpectralDensity", "lanczos"]
