"""One rank of the data-parallel tests (tests/test_distributed.py launches it; also imported there).

``python tests/_distributed_worker.py OUT_DIR --first F --last L [--resume CKPT] [--crash-rank R]``
trains a small MLP with data-parallel DP-SGD on steps ``F..L-1`` (σ > 0, momentum), writes this
rank's params/ledger/metrics and a noise probe to ``OUT_DIR/rank{r}.pt``, and the checkpoint
(rank 0) to ``OUT_DIR/ckpt.pt``.
"""

from __future__ import annotations

import argparse
import os

import torch

from dpfunc import Key, dpsgd, pad_batch, padded_batch_size, poisson_sample, privacy_ledger, run_keys
from dpfunc.distributed import (World, init_world, run_and_exit, make_distributed_step, rank_batch_size, rank_slice, save_on_rank0,
                                shared_entropy)

N, Q, SEED, LR = 48, 0.25, 7, 0.5
SIGMA, C = 1.3, 0.7
PROBE_DIM, PROBE_SIGMA, PROBE_C = 4000, 2.0, 0.5


def data():
    g = Key(123).generator()
    x = torch.randn(N, 5, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
    y = (x[:, 0] - x[:, 1] > 0).to(torch.get_default_dtype())
    return x, y


def init_params():
    g = Key(9).generator()
    dt = torch.get_default_dtype()
    return {"w1": torch.randn(5, 8, generator=g, dtype=torch.float64).to(dt) * 0.5, "b1": torch.zeros(8),
            "w2": torch.randn(8, generator=g, dtype=torch.float64).to(dt) * 0.5}


def loss_fn(p, b, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return (h @ p["w2"] - y) ** 2


def make_tx(secure: bool = False, entropy=None):
    return dpsgd(LR, noise_multiplier=SIGMA, max_grad_norm=C, sampling_rate=Q, num_examples=N,
                 key=run_keys(Key(SEED)).noise, momentum=0.9,
                 **({"secure": True, "secure_entropy": entropy} if secure else {}))


def train(world: World, first: int, last: int, params=None, opt_state=None, crash_rank: int | None = None,
          secure: bool = False, fail_rank: int | None = None, secure_shared: bool = False):
    """Steps ``first..last-1``; returns ``(params, opt_state, metrics per step)``."""
    x, y = data()
    tx = make_tx(secure or secure_shared, shared_entropy(world) if secure_shared else None)
    if params is None:
        params = init_params()
        opt_state = tx.init(params)
    step = make_distributed_step(loss_fn, tx, world=world)
    size = rank_batch_size(padded_batch_size(N, Q), world.size)
    sampling = run_keys(Key(SEED)).sampling
    metrics = []
    for t in range(first, last):
        idx = poisson_sample(sampling.fold_in(t), N, Q)  # the same on every rank
        mine = rank_slice(idx, world.rank, world.size)
        batch, mask = pad_batch((x[mine], y[mine]), size)
        if fail_rank == world.rank and t == last - 1:
            mask = mask[:-1]  # this rank alone raises (a bad mask) in the last step; the others must not wait
        params, opt_state, m = step(params, opt_state, batch, mask)
        metrics.append([float(v) for v in m])
        if crash_rank == world.rank:
            os._exit(3)  # a rank dies mid-run, without any goodbye
    return params, opt_state, metrics


def noise_probe(world: World):
    """One step on a model whose gradient is exactly 0: the update is -lr · noise / (q·n)."""
    tx = dpsgd(1.0, noise_multiplier=PROBE_SIGMA, max_grad_norm=PROBE_C, sampling_rate=Q, num_examples=N,
               key=run_keys(Key(SEED + 1)).noise)
    params = {"z": torch.zeros(PROBE_DIM)}
    step = make_distributed_step(lambda p, b, x: (p["z"] * 0).sum() + x.sum() * 0, tx, world=world)
    idx = rank_slice(poisson_sample(Key(5), N, Q), world.rank, world.size)
    new, _, _ = step(params, tx.init(params), (torch.ones(len(idx), 3),))
    return new["z"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--last", type=int, required=True)
    ap.add_argument("--resume")
    ap.add_argument("--crash-rank", type=int)
    ap.add_argument("--fail-rank", type=int, help="this rank raises alone in the last step")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--secure", action="store_true", help="noise from os.urandom (must be refused)")
    ap.add_argument("--secure-shared", action="store_true", help="secure noise keyed by rank 0's entropy (must run)")
    a = ap.parse_args()
    torch.set_default_dtype(getattr(torch, a.dtype))
    torch.set_num_threads(1)
    world = init_world("cpu", timeout_s=30)
    params = opt_state = None
    if a.resume:
        from dpfunc.bridge.checkpoint import load_checkpoint

        state = load_checkpoint(a.resume)
        params, opt_state = state["params"], state["opt_state"]
    params, opt_state, metrics = train(world, a.first, a.last, params, opt_state, a.crash_rank, a.secure, a.fail_rank, a.secure_shared)
    torch.save({"params": params, "ledger": privacy_ledger(opt_state), "metrics": metrics, "probe": noise_probe(world),
                "world_size": world.size}, os.path.join(a.out, f"rank{world.rank}.pt"))
    save_on_rank0(os.path.join(a.out, "ckpt.pt"), {"params": params, "opt_state": opt_state}, world)
    if world.size > 1:
        torch.distributed.destroy_process_group()  # polite, but not enough: run_and_exit still leaves by os._exit
    return 0


if __name__ == "__main__":
    run_and_exit(main)
