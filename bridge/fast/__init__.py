"""Fast per-example clipping for ``nn.Module`` models: ghost norms, mixed instantiation, book-keeping.

:func:`fast_engine` returns a :class:`~dpfunc.GradEngine` equal to ``vmap_engine(..., clipping=...)``
(the oracle) at about the cost of one non-private step, without ``B × |θ|`` memory.
"""

from dpfunc.bridge.fast.engine import FastPass, fast_engine
from dpfunc.bridge.fast.rules import RULES, register_rule

__all__ = ["fast_engine", "FastPass", "RULES", "register_rule"]
