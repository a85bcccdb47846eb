"""Root pytest configuration: the namespace of docstring examples (``--doctest-modules``).

Every docstring example in ``dpfunc`` and ``dpfunc.bridge`` runs in CI with ``torch``, ``nn``, ``F``,
``dpfunc`` and dpfunc's public names already imported, as a user's session would have them.
"""

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import torch
    import torch.nn.functional as F
    from torch import nn

    import dpfunc
    import dpfunc.bridge

    doctest_namespace.update({"torch": torch, "nn": nn, "F": F, "dpfunc": dpfunc})
    doctest_namespace.update({name: getattr(dpfunc, name) for name in dpfunc.__all__})
    torch.manual_seed(0)  # examples that draw from the global RNG print the same numbers every run (tests only)
