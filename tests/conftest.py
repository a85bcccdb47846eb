"""Shared test configuration: hypothesis profiles and small helpers.

Profiles (select with ``HYPOTHESIS_PROFILE``): ``ci`` is derandomized with no deadline, so CI is
reproducible; ``dev`` explores more examples. Under ``CI=true`` the default is ``ci``.
Hypothesis never seeds torch: tests draw torch seeds as data and use ``dpfunc.Key`` / local generators.
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# Tests are small; two threads match the CI machine and keep timings stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The folder holding ``pneumoniamnist.npz``: ``$DPFUNC_DATA``, else ``../shared/data`` beside the
    checkout (where CI lays it). Tests that need the real file are skipped, with the reason, elsewhere."""
    import os

    for candidate in (os.environ.get("DPFUNC_DATA"), _REPO.parent / "shared" / "data"):
        if candidate and (pathlib.Path(candidate) / "pneumoniamnist.npz").is_file():
            return pathlib.Path(candidate)
    pytest.skip("pneumoniamnist.npz not found (set DPFUNC_DATA)")
