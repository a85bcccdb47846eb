"""One rank of the bridge's data-parallel test (tests/test_distributed.py launches it; also imported there).

``python tests/_bridge_distributed_worker.py OUT_DIR --steps S [--engine fast|vmap]`` trains a small
``nn.Module`` with an unchanged torch loop through ``make_private(..., world=init_world("cpu"))``
(σ > 0, SGD with momentum, mean-reduced loss) and writes this rank's parameters and ledger to
``OUT_DIR/rank{r}.pt``. ``train(world, steps, engine)`` is the same loop for one process.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfunc import Key
from dpfunc.bridge import make_private
from dpfunc.distributed import World, init_world, run_and_exit

N, BATCH, SEED, SIGMA, C = 48, 12, 11, 1.1, 0.8


def train(world: World | None, steps: int, engine: str = "fast", secure: bool = False):
    g = Key(123).generator()
    x = torch.randn(N, 5, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    gen = Key(9).generator()
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    model, opt, loader = make_private(net, opt, DataLoader(TensorDataset(x, y), batch_size=BATCH), key=Key(SEED),
                                      noise_multiplier=SIGMA, max_grad_norm=C, grad_sample_mode=engine, world=world,
                                      secure=secure)
    done = 0
    while done < steps:
        for xb, yb in loader:
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            done += 1
            if done == steps:
                break
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, opt.ledger


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--engine", default="fast")
    ap.add_argument("--secure", action="store_true", help="secure mode: rank 0's entropy keys every rank's noise")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = init_world("cpu", timeout_s=30)
    params, ledger = train(world, a.steps, a.engine, a.secure)
    torch.save({"params": params, "ledger": ledger, "world_size": world.size}, os.path.join(a.out, f"rank{world.rank}.pt"))
    if world.size > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_and_exit(main)  # never sys.exit in a rank: gloo can SIGABRT at interpreter teardown
