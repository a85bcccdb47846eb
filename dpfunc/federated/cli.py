"""``dpfunc federated``: federated DP training across simulated hospital sites.

Examples::

    dpfunc federated --sites 3 --rounds 15 --epsilon 3                      # in process, IID split
    dpfunc federated --partition dirichlet --alpha 0.5 --run-dir runs/fed-dir
    dpfunc federated --engine flower --sites 3 --rounds 5                    # one process per site (Flower)
    dpfunc federated --device cuda --threads 1                               # sites compute on the GPU
    dpfunc federated --run-dir runs/fed-dir --resume                         # continue after an interruption
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "config_from_args", "main"]


def _fields():
    from dpfunc.federated.job import FederatedConfig

    return FederatedConfig()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare ``dpfunc federated`` on the main parser's subparsers."""
    return _declare(sub.add_parser(
        "federated", help="federated DP training across sites (in process or on Flower), writes a run folder",
        description="Each site trains with DP-SGD on its own shard (its own key and privacy ledger); the server "
                    "averages the sites' models. Writes config.json, checkpoint.pt (every site's ledger), "
                    "metrics.json, model.pt and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=__doc__.split("Examples::", 1)[1]))


def _declare(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = _fields()
    p.add_argument("--sites", type=int, default=d.sites, help="number of sites (hospitals)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="server rounds")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs per round at each site")
    p.add_argument("--local-steps", type=int, default=None,
                   help="local DP-SGD steps per round at each site, instead of --local-epochs (1 = FedSGD: no client drift)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target ε of EACH site (its patients' guarantee)")
    p.add_argument("--delta", type=float, default=d.delta, help="target δ of each site")
    p.add_argument("--partition", choices=["iid", "dirichlet"], default=d.partition, help="how the training split is shared out")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration (label skew; smaller = more skew)")
    p.add_argument("--fraction", type=float, default=d.fraction, help="fraction of sites asked each round")
    p.add_argument("--min-sites", type=int, default=d.min_sites, help="least usable answers for a round to count")
    p.add_argument("--engine", choices=["inprocess", "flower"], default=d.engine,
                   help="inprocess: all sites in this process; flower: a Flower SuperLink + one SuperNode per site")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="each site's expected Poisson batch size")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="local SGD step size")
    p.add_argument("--momentum", type=float, default=d.momentum, help="local SGD momentum")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="per-example clipping bound C")
    p.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam"], default=d.server_optimizer,
                   help="server update on the pseudo-gradient (fedavg: the weighted mean itself)")
    p.add_argument("--server-lr", type=float, default=d.server_learning_rate, help="FedAvgM / FedAdam step size")
    p.add_argument("--server-momentum", type=float, default=d.server_momentum, help="FedAvgM momentum")
    p.add_argument("--average-decay", type=float, default=d.average_decay,
                   help="server-side averaging of the global models over rounds (running mean, then an EMA with this "
                        "decay; 0 = the last model). Post-processing: no privacy cost")
    p.add_argument("--aggregator", default=d.aggregator, help="registered aggregator (dpfunc.federated.AGGREGATORS)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="the server learns only sums (Bonawitz et al. 2017; same as --aggregator secagg)")
    p.add_argument("--distributed-noise", action="store_true",
                   help="distributed DP (implies --secure-aggregation, in process): each round is ONE DP-SGD step over "
                        "all sites' data and each site adds only a share of the discrete-Gaussian noise, so that any "
                        "unmasked sum carries the full noise if at most --colluding sites share theirs with the server")
    p.add_argument("--colluding", type=int, default=d.colluding_sites,
                   help="with --distributed-noise: sites assumed to collude with the server (< threshold t, a majority "
                        "of the sites asked per round)")
    p.add_argument("--report-train-loss", action="store_true",
                   help="debugging only: each site also sends its raw mean training loss every round (logged, "
                        "'train_loss' in metrics.json). NOT covered by ε: a non-private statistic of the site's data "
                        "given to the server. Default: sites send only their DP model")
    p.add_argument("--grad-engine", choices=["fast", "vmap"], default=d.grad_engine, help="per-example clipping engine")
    p.add_argument("--accountant", choices=["pld", "rdp"], default=d.accountant, help="calibration and ε reports")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training examples (demos, tests)")
    p.add_argument("--round-timeout", type=float, default=d.round_timeout, help="seconds to wait for a round's answers (flower)")
    p.add_argument("--supernode-auth", action="store_true",
                   help="flower: TLS and Flower's SuperNode authentication (each site's key pair registered with the "
                        "SuperLink; unregistered nodes are refused). With --write-flower-app: print the deployment's "
                        "commands with it")
    p.add_argument("--seed", type=int, default=d.seed, help="root of every key (0 is valid)")
    p.add_argument("--data-dir", default=None, help="folder holding pneumoniamnist.npz (default: $DPFUNC_DATA, else the cache)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/federated-<partition>-s<S>-eps<ε>-seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (same flags); a round that was in flight when it stopped is "
                        "charged to the sites asked in it and re-run with fresh noise keys")
    p.add_argument("--write-flower-app", action="store_true",
                   help="only write the Flower app for this run (RUN/flower/app) and print the `flwr run` command: "
                        "for a deployment whose SuperLink and SuperNodes run on other machines")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the test intervals")
    from dpfunc.cli import add_compute_arguments

    add_compute_arguments(p, help="where the sites compute (in process: all of them; flower: each SuperNode, "
                                  "node-config device=...); the server's averaging and evaluation stay on the CPU. "
                                  "auto = the GPU when CUDA is available")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    from dpfunc.federated.job import FederatedConfig

    return FederatedConfig(
        sites=args.sites, rounds=args.rounds, local_epochs=args.local_epochs, local_steps=args.local_steps, epsilon=args.epsilon, delta=args.delta,
        partition=args.partition, alpha=args.alpha, fraction=args.fraction, min_sites=args.min_sites,
        batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum, max_grad_norm=args.max_grad_norm,
        server_optimizer=args.server_optimizer, server_learning_rate=args.server_lr, average_decay=args.average_decay,
        server_momentum=args.server_momentum,
        aggregator="secagg" if args.secure_aggregation or args.distributed_noise else args.aggregator,
        distributed_noise=args.distributed_noise, colluding_sites=args.colluding, report_train_loss=args.report_train_loss,
        engine=args.engine,
        grad_engine=args.grad_engine, train_subset=args.train_subset, round_timeout=args.round_timeout,
        accountant=args.accountant, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Execute ``dpfunc federated``; returns the exit code (2 for a failed round)."""
    from dpfunc.federated.rounds import RoundFailedError

    cfg = config_from_args(args)
    run_dir = Path(args.run_dir or f"runs/federated-{cfg.partition}-s{cfg.sites}-eps{cfg.epsilon:g}-seed{cfg.seed}")
    if not getattr(args, "write_flower_app", False):  # a deployment's sites choose their own device (node config)
        from dpfunc.cli import compute_device

        device = compute_device(args)  # --threads; refuse a device this machine lacks, before anything is written
    if getattr(args, "write_flower_app", False):
        from dpfunc.federated.flower.driver import write_app

        app = write_app(cfg, run_dir=run_dir, data_dir=args.data_dir, resume=args.resume,
                        bootstrap_resamples=args.bootstrap)
        from dpfunc.federated.flower.driver import launch_commands

        print(f"wrote {app}/pyproject.toml; submit with:  flwr run {app} <superlink-connection> --format json\n"
              f"results appear in {run_dir.resolve()} on the machine that runs the ServerApp (the SuperLink's)\n"
              f"processes of a deployment on separate machines (TLS):\n"
              f"{launch_commands(cfg, supernode_auth=args.supernode_auth)}")
        return 0
    try:
        if cfg.engine == "flower":
            from dpfunc.federated.flower.driver import run_flower

            result = run_flower(cfg, data_dir=args.data_dir, run_dir=run_dir, resume=args.resume,
                                bootstrap_resamples=args.bootstrap, log=print, supernode_auth=args.supernode_auth,
                                device=str(device), threads=getattr(args, "threads", None))
        else:
            from dpfunc.federated.job import run_federated

            result = run_federated(cfg, data_dir=args.data_dir, run_dir=run_dir, resume=args.resume,
                                   progress=False if args.quiet else None, bootstrap_resamples=args.bootstrap,
                                   device=device)
    except RoundFailedError as e:
        print(f"dpfunc federated: error: {e}", file=sys.stderr)
        return 2
    t = result["test"]
    eps = ", ".join(f"site {s['site']} (n={s['n']}): ε={s['epsilon']:.3f}" for s in result["sites"])
    print(f"test ROC-AUC {t['roc_auc']:.4f}  accuracy {t['accuracy']:.4f}  (round {result['best_round']} of "
          f"{result['rounds']}, selected on validation)\nper-site guarantee at δ={result['delta']:g}: {eps}\n"
          f"run folder: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m dpfunc.federated.cli``), the same as ``dpfunc federated``."""
    p = _declare(argparse.ArgumentParser(prog="dpfunc federated", formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = p.parse_args(argv)
    from dpfunc.cli import CommandError

    try:
        return run(args)
    except (CommandError, ValueError, OSError) as e:
        print(f"dpfunc federated: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
