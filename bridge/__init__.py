"""dpfunc.bridge: ordinary ``nn.Module`` code in, dpfunc's pure functions out.

Everything that knows about modules (functionalisation, hooks, model surgery, optimizers that mutate
``.grad``) lives here; the functional core in :mod:`dpfunc` never holds a module.
"""

from dpfunc.bridge.functional import ApplyFn, functionalize

__all__ = ["functionalize", "ApplyFn"]
