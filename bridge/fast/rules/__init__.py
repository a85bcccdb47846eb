"""Per-layer rules of the fast engine, one small module per layer family, behind one registry.

Importing this package registers the built-in rules (``linear``, ``conv``, ``embedding``, ``norm``,
``attention``). A new layer type gets a rule with :func:`register_rule`; nothing is ever attached to
parameters or modules.

    =================  ==========================================================================
    module             layers
    =================  ==========================================================================
    :mod:`.linear`     ``nn.Linear`` (any leading dims)
    :mod:`.conv`       ``nn.Conv1d``, ``nn.Conv2d``
    :mod:`.embedding`  ``nn.Embedding``
    :mod:`.norm`       ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``
    :mod:`.attention`  ``nn.MultiheadAttention`` (decomposed into tapped projections by the engine)
    =================  ==========================================================================
"""

from dpfunc.bridge.fast.rules._common import RULES, Call, LayerGrads, Rule, register_rule, rule_for
from dpfunc.bridge.fast.rules import attention, conv, embedding, linear, norm  # noqa: F401  (registers the rules)

__all__ = ["RULES", "Call", "LayerGrads", "Rule", "register_rule", "rule_for"]
