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


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module of tiny tensors (restored afterwards): thread hand-off
    costs dominate there, and on a loaded 2-core machine two threads were up to 30× slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The folder holding ``pneumoniamnist.npz``: ``$DPFUNC_DATA``, else ``../shared/data`` beside the
    checkout (where CI lays it). Tests that need the real file are skipped, with the reason, elsewhere."""
    import os

    for candidate in (os.environ.get("DPFUNC_DATA"), _REPO.parent / "shared" / "data"):
        if candidate and (pathlib.Path(candidate) / "pneumoniamnist.npz").is_file():
            return pathlib.Path(candidate)
    pytest.skip("pneumoniamnist.npz not found (set DPFUNC_DATA)")


# Devices: a test that takes a ``device`` argument runs once per device — the CPU always, and CUDA,
# which is skipped (with the reason) on a machine without a GPU, so the same suite checks a GPU where
# there is one. (A CUDA-only test carries its own ``skipif(not torch.cuda.is_available())``.)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none "
                                                                          "(the case runs where torch.cuda.is_available())")
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"),
           pytest.param(torch.device("cuda", 0), id="cuda", marks=requires_cuda)]


def pytest_generate_tests(metafunc):
    """Parametrise every test with a ``device`` argument over :data:`DEVICES` (unless it parametrises it itself)."""
    if "device" in metafunc.fixturenames and not any(
            "device" in (m.args[0] if isinstance(m.args[0], (list, tuple)) else m.args[0].replace(" ", "").split(","))
            for m in metafunc.definition.iter_markers("parametrize")):
        metafunc.parametrize("device", DEVICES)
