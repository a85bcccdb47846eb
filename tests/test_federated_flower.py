"""End to end on Flower's Deployment Engine (a SuperLink and one SuperNode per site, on localhost).

Small and bounded: 3 sites, 1 round, 150 training examples, hard timeouts; the driver kills every
process group it started in ``finally`` and the tests check that none is left.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

pytest.importorskip("flwr")

from dpfunc.bridge.checkpoint import load_checkpoint  # noqa: E402
from dpfunc.federated.flower import run_flower  # noqa: E402
from dpfunc.federated.job import FederatedConfig, run_federated  # noqa: E402

pytestmark = pytest.mark.slow

TINY = dict(sites=3, rounds=1, train_subset=150, batch_size=25, accountant="rdp")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def _alive(pid: int, wait: float = 10.0) -> bool:
    deadline = time.monotonic() + wait
    while _group_members(pid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def test_flower_equals_inprocess_bit_for_bit(tmp_path, data_dir):
    # Both engines on ONE torch thread: CPU kernels may reduce in another order with another thread count.
    # Unpinned, the test failed with OMP_NUM_THREADS=1 in the test's environment (the last bits of the
    # weights differed) and passed without it; pinned, it passes either way.
    started = {}
    cfg = FederatedConfig(**TINY, engine="flower", round_timeout=300)
    fl = run_flower(cfg, data_dir=data_dir, run_dir=tmp_path / "flower", bootstrap_resamples=10, log=lambda s: None,
                    on_registered=started.update, run_timeout=600, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_federated(FederatedConfig(**TINY), data_dir=data_dir, run_dir=tmp_path / "inproc", progress=False,
                            log=lambda s: None, bootstrap_resamples=10)
    finally:
        torch.set_num_threads(threads)
    a = load_checkpoint(tmp_path / "flower" / "checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "inproc" / "checkpoint.pt")["state"]
    assert a.round == b.round == 1
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k
        assert torch.equal(a.average[k], b.average[k]), k  # the server-side average too
    for sa, sb in zip(a.sites, b.sites):
        assert sa.ledger == sb.ledger and sa.steps == sb.steps
    assert fl["test"] == ref["test"] and [s["epsilon"] for s in fl["sites"]] == [s["epsilon"] for s in ref["sites"]]
    assert fl["history"][0]["sites_answered"] == [0, 1, 2]
    assert len(started) == 3 and not any(_alive(p.pid) for p in started.values())


def test_flower_killed_site_and_nan_update_are_excluded(tmp_path, data_dir):
    started = {}

    def kill_site_2(sites):
        started.update(sites)
        os.killpg(sites[2].pid, signal.SIGKILL)

    cfg = FederatedConfig(**TINY, engine="flower", round_timeout=90, min_sites=1)
    m = run_flower(cfg, data_dir=data_dir, run_dir=tmp_path / "run", bootstrap_resamples=10, log=lambda s: None,
                   site_node_config={1: {"fault": "nan"}}, on_registered=kill_site_2, run_timeout=600)
    h = m["history"][0]
    assert h["sites_answered"] == [0]
    assert "non-finite" in h["excluded"]["1"] and "no reply" in h["excluded"]["2"]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    assert all(torch.isfinite(v).all() for v in state.params.values())
    # the excluded sites may have trained: their ledgers are charged the round anyway
    assert [s["steps"] for s in m["sites"]] == [2, 2, 2]
    assert not any(_alive(p.pid) for p in started.values())


def test_flower_supernode_auth_admits_registered_sites_only(tmp_path, data_dir):
    """TLS + Flower's SuperNode authentication end to end: the registered sites train the round (the same
    model as in process); a SuperNode with an unregistered key that claims site 0 is refused (exit code 305)."""
    import subprocess
    import sys

    from dpfunc.federated.flower.driver import _free_port, flower_env, make_credentials

    run_dir, started, intruder = tmp_path / "auth", {}, {}

    def try_intruder(sites):
        started.update(sites)
        fl = run_dir / "flower"
        address = next(line.split('"')[1] for line in (fl / "home" / "config.toml").read_text().splitlines()
                       if line.startswith("address"))
        stranger = make_credentials(tmp_path / "stranger", 1)
        with open(tmp_path / "intruder.log", "wb") as log:
            intruder["proc"] = p = subprocess.Popen(
                [str(os.path.join(os.path.dirname(sys.executable), "flower-supernode")), "--root-certificates",
                 str(fl / "credentials" / "ca.crt"), "--superlink", address, "--auth-supernode-private-key",
                 str(stranger.site_keys[0]), "--node-config", "partition-id=0 num-partitions=2", "--port", str(_free_port())],
                env=flower_env(fl / "home"), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            intruder["rc"] = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            intruder["rc"] = None

    cfg = FederatedConfig(**{**TINY, "sites": 2}, engine="flower", round_timeout=300)
    try:
        m = run_flower(cfg, data_dir=data_dir, run_dir=run_dir, bootstrap_resamples=10, log=lambda s: None,
                       on_registered=try_intruder, run_timeout=600, supernode_auth=True)
    finally:
        if "proc" in intruder:
            try:
                os.killpg(intruder["proc"].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert intruder["rc"] not in (None, 0)
    assert "Exit Code: 305" in (tmp_path / "intruder.log").read_text(errors="replace")
    assert m["history"][0]["sites_answered"] == [0, 1]
    link_log = (run_dir / "flower" / "superlink.log").read_text(errors="replace")
    assert "https://127.0.0.1" in link_log and "authentication is disabled" not in link_log
    ref = run_federated(FederatedConfig(**{**TINY, "sites": 2}), data_dir=data_dir, progress=False, log=lambda s: None,
                        bootstrap_resamples=10)
    assert m["test"] == ref["test"] and [s["epsilon"] for s in m["sites"]] == [s["epsilon"] for s in ref["sites"]]
    assert len(started) == 2 and not any(_alive(p.pid) for p in [*started.values(), intruder["proc"]])
