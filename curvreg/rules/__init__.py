"""Layer rules: one small file per layer family.

``default_rules()`` returns a fresh ``{type: LayerRule}`` dict; nothing is registered at import.
The tape applies these rules at the op (``curvreg.ops``): each covered op call is handed to the
rule of its layer type through a shell module, whichever module made the call. A rule passed
for a module type in ``GradNormTape(rules=...)`` is applied to that module's calls instead.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from torch import nn

from ..ops import ElementwiseAffine, NormalizedAffine, ParamFunction, TransposedLinear

from ._base import LayerRule, fold_groups, sq_from_grads, sum_groups
from .conv import CONV_RULE
from .elementwise import ELEMENTWISE_RULE
from .embedding import EMBEDDING_RULE
from .fallback import fallback_grads
from .linear import LINEAR_RULE, TRANSPOSED_LINEAR_RULE
from .param_function import PARAM_FUNCTION_RULE
from .norm import (BATCH_NORM_EVAL_RULE, GROUP_NORM_RULE, LAYER_NORM_RULE, NORMALIZED_AFFINE_RULE,
                   RMS_NORM_RULE)

__all__ = ["LayerRule", "default_rules", "merge_rules", "fallback_grads", "fold_groups",
           "sum_groups", "sq_from_grads"]


def default_rules() -> Dict[type, LayerRule]:
    """The built-in ``{layer type: rule}`` mapping, keyed by the shell types of ``curvreg.ops``."""
    norm_eval = {t: BATCH_NORM_EVAL_RULE for t in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)}
    return {
        nn.Linear: LINEAR_RULE,
        TransposedLinear: TRANSPOSED_LINEAR_RULE,
        nn.Conv1d: CONV_RULE, nn.Conv2d: CONV_RULE, nn.Conv3d: CONV_RULE,
        nn.Embedding: EMBEDDING_RULE,
        nn.LayerNorm: LAYER_NORM_RULE,
        nn.GroupNorm: GROUP_NORM_RULE,
        nn.RMSNorm: RMS_NORM_RULE,
        ElementwiseAffine: ELEMENTWISE_RULE,
        NormalizedAffine: NORMALIZED_AFFINE_RULE,
        ParamFunction: PARAM_FUNCTION_RULE,
        **norm_eval,
    }


def merge_rules(extra: Optional[Mapping[type, LayerRule]], allow_override: bool = False,
                ) -> Dict[type, LayerRule]:
    """Defaults extended by ``extra``; replacing a built-in rule needs ``allow_override=True``."""
    rules = default_rules()
    for typ, rule in (extra or {}).items():
        if not isinstance(typ, type) or not issubclass(typ, nn.Module):
            raise TypeError(f"rules keys must be nn.Module subclasses, got {typ!r}")
        if not isinstance(rule, LayerRule):
            raise TypeError(f"rule for {typ.__name__} must be a curvreg.rules.LayerRule, got "
                            f"{type(rule).__name__}")
        if typ in rules and not allow_override:
            raise ValueError(f"a built-in rule for {typ.__name__} exists; pass "
                             "allow_override=True to replace it")
        rules[typ] = rule
    return rules
