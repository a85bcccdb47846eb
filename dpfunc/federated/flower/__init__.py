"""The Flower engine (the only part of dpfunc that imports ``flwr``; install ``dpfunc[federated]``).

:func:`run_flower` starts a SuperLink and one SuperNode per site on localhost, submits the app
(:mod:`dpfunc.federated.flower.apps`) and checks the result itself; ``dpfunc federated --engine flower``
calls it.
"""

from dpfunc.federated.flower.driver import FlowerRunError, run_flower

__all__ = ["run_flower", "FlowerRunError"]
