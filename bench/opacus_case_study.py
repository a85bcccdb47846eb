"""The case study trained with Opacus instead of dpfunc: same CNN, data, budget and hyper-parameters.

A reference point for the README's claim "above Opacus at equal ε, in no more wall time". Opacus is an
optional peer (``pip install opacus``, the ``bench`` extra); dpfunc never imports it.

    python bench/opacus_case_study.py --data-dir ../shared/data --seeds 0 1 2

Same as ``dpfunc train`` (defaults): ``SmallCNN`` from the same key, fixed normalisation, Poisson sampling
at q = 256/n, 15 epochs, C = 1, SGD lr 1 momentum 0.9, σ calibrated by Opacus to ε = 3 at δ = 1e-5 with its
PRV accountant, model selection on validation ROC-AUC, test metrics once. Opacus trains the last iterate
(no averaging: that is not part of Opacus); ``--ema`` adds dpfunc's averaging for an ablation.
Writes ``bench/results/opacus_case_study.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from dpfunc.data import pneumoniamnist
from dpfunc.keys import Key, run_keys
from dpfunc.metrics import binary_metrics
from dpfunc.models import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, machine_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def scores_of(model, images):
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(images[i : i + 1024]).softmax(-1)[:, 1] for i in range(0, len(images), 1024)])
    model.train()
    return out


def run(seed: int, data_dir: str | None, epsilon: float, epochs: int, batch_size: int, lr: float, ema: float) -> dict:
    from opacus import PrivacyEngine

    train, val, test = (pneumoniamnist(s, data_dir) for s in ("train", "val", "test"))
    model = SmallCNN(key=run_keys(Key(seed)).init)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.images, train.labels), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon, target_delta=1e-5,
            epochs=epochs, max_grad_norm=1.0)
    best_auc, best_state, elapsed = -1.0, None, 0.0
    average = None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for x, y in loader:
            if len(x) == 0:
                optimizer.zero_grad()
                continue
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if ema:
                cur = {k: v.detach().clone() for k, v in model._module.state_dict().items()}
                average = cur if average is None else {k: ema * average[k] + (1 - ema) * cur[k] for k in cur}
        elapsed += time.perf_counter() - t0
        state = average if ema else {k: v.detach().clone() for k, v in model._module.state_dict().items()}
        probe = SmallCNN(key=run_keys(Key(seed)).init)
        probe.load_state_dict(state)
        auc = binary_metrics(val.labels, scores_of(probe, val.images)).roc_auc
        if auc > best_auc:
            best_auc, best_state = auc, state
        print(f"seed {seed} epoch {epoch + 1}/{epochs} val AUC {auc:.4f} ({elapsed:.0f}s)", flush=True)
    probe = SmallCNN(key=run_keys(Key(seed)).init)
    probe.load_state_dict(best_state)
    m = binary_metrics(test.labels, scores_of(probe, test.images))
    return {"seed": seed, "epsilon": engine.get_epsilon(1e-5), "sigma": optimizer.noise_multiplier, "train_seconds": elapsed,
            "roc_auc": m.roc_auc, "accuracy": m.accuracy, "mcc": m.mcc, "val_auc": best_auc}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.0, help="average iterates like dpfunc (0 = Opacus as is)")
    args = p.parse_args(argv)
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("opacus is not installed: pip install opacus (the 'bench' extra)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [run(s, args.data_dir, args.epsilon, args.epochs, args.batch_size, args.lr, args.ema) for s in args.seeds]
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows)) for k in ("roc_auc", "accuracy", "train_seconds", "epsilon")}
    RESULTS.mkdir(exist_ok=True)
    env = machine()
    out = {"env": env, "args": vars(args), "runs": rows, "summary": summary}
    (RESULTS / f"opacus_case_study{'_ema' if args.ema else ''}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"Machine: {machine_line(env)}")
    for k, (mu, sd) in summary.items():
        print(f"{k:<14} {mu:.4f} ± {sd:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
