"""Secure aggregation: CPU time and bytes per site per round, against plain FedAvg.

One command regenerates ``bench/results/secagg.{md,json}``::

    python bench/secagg.py             # 3/10/50 sites × 1e5/1e6 parameters (+1e7 at 3 and 10 sites)
    python bench/secagg.py --quick     # 3/10 sites × 1e5 parameters

Method (figures, not a test):
    * All sites run in this process (:func:`dpfunc.secagg.run_round`); each stage function's CPU time
      (``time.process_time``) is charged to the site or the server that runs it. "site CPU" is the mean
      over sites of one site's four stages plus its fixed-point encoding of ``P`` float32 values;
      "server CPU" is the server's four stages (routing, summing, reconstruction, mask removal).
      Median of ``--repeats`` rounds.
    * Plain FedAvg baseline, same process: a site uploads its float32 update (``4·P`` bytes) and the
      server sums ``n`` float32 vectors (timed the same way).
    * Bytes are protocol payload (ids 8 B, keys 32 B, shares 66 B, AES-GCM ciphertexts, the masked vector
      packed at ``k`` bits per entry as :mod:`dpfunc.secagg.codec` sends it), not transport framing; the
      global-model download (``4·P`` in both) is included in the "total" expansion. Site CPU includes
      packing. "upload × plain at precision" compares with sending the same values in the clear at the
      same precision (2 bytes per entry for 16-bit rows, 4 for 26-bit rows).
    * Precision: "16-bit" rows quantise to 16 signed bits and use the smallest ring that holds the sum of
      ``n`` sites (``(n·(2^15 − 1)).bit_length() + 1`` bits); "26-bit" rows are the SecureAggregator
      default (a 32-bit ring).
    * SecAgg+ rows use a Harary graph of degree ``2⌈log2 n⌉`` (Bell et al. 2020) with t = a majority
      of the neighbourhood; complete-graph rows use t = ⌊n/2⌋ + 1.
    * A dropout row: 10 % of the sites drop after sharing keys (their masks are rebuilt by the server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dpfunc.secagg import FixedPoint, SecAggConfig, Stage, run_round

RESULTS = Path(__file__).resolve().parent / "results"
CASE_STUDY_PARAMS = 23_650          # dpfunc.models.SmallCNN (the case study's CNN)
CASE_STUDY_EPOCH_IDLE_S = 3.0       # one local epoch of the case study, idle 2-core machine (README)


from _machine import cpu_model as _cpu_model  # noqa: E402


def _measure(n: int, size: int, *, bits: int, neighbours, drop_frac: float, repeats: int, seed: int) -> dict:
    fp = FixedPoint(clip=1.0, bits=bits)
    ring_bits = (n * fp.max_int).bit_length() + 1 if bits == 16 else 32   # the smallest ring that holds the sum
    group = n if neighbours is None else min(n, neighbours + 1)
    cfg = SecAggConfig(threshold=group // 2 + 1, vector_length=size, ring_bits=ring_bits, neighbours=neighbours)
    rng = np.random.default_rng(seed)
    floats = {u: rng.standard_normal(size, dtype=np.float32) * 0.05 for u in range(n)}
    dropped = frozenset(range(0, n, max(1, round(1 / drop_frac)))) if drop_frac else frozenset()
    dropouts = {Stage.MASKED_INPUT: dropped} if dropped else None
    rows = []
    for _ in range(repeats):
        enc_s, inputs = {}, {}
        for u, x in floats.items():
            t0 = time.process_time()
            q, _ = fp.encode(x)
            inputs[u] = cfg.ring.from_signed(q)
            enc_s[u] = time.process_time() - t0
        result, st = run_round(cfg, inputs, dropouts=dropouts)
        t0 = time.process_time()   # the wire format: each site packs its masked vector at k bits per entry
        cfg.ring.pack(inputs[0])
        pack_s = time.process_time() - t0
        expect = cfg.ring.zeros(size)
        for u in result.included:
            expect += inputs[u]
        assert np.array_equal(result.total, cfg.ring.reduce(expect)), "secure sum differs from the plain sum"
        # plain FedAvg: the server adds n float32 vectors
        t0 = time.process_time()
        acc = np.zeros(size, dtype=np.float64)
        for u in result.included:
            acc += floats[u]
        plain_server = time.process_time() - t0
        sites = list(inputs)
        rows.append({
            "site_cpu_s": statistics.mean(st.site_seconds[u] + enc_s[u] for u in sites) + pack_s,
            "site_cpu_max_s": max(st.site_seconds[u] + enc_s[u] for u in sites) + pack_s,
            "server_cpu_s": st.server_seconds,
            "plain_server_cpu_s": plain_server,
            "sent_B": statistics.mean(st.sent[u] for u in result.included),
            "received_B": statistics.mean(st.received[u] for u in result.included),
        })
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    plain_up = 4 * size
    return {
        "sites": n, "params": size, "precision_bits": bits, "ring_bits": ring_bits,
        "container_bytes": cfg.ring.dtype.itemsize, "graph": "complete" if neighbours is None else f"harary-{neighbours}",
        "threshold": cfg.threshold, "dropped": sorted(dropped), **med,
        "plain_sent_B": plain_up, "model_download_B": 4 * size,
        "upload_expansion": med["sent_B"] / plain_up,
        "upload_vs_plain_at_precision": med["sent_B"] / (size * math.ceil(bits / 8)),
        "total_expansion": (med["sent_B"] + med["received_B"] + 4 * size) / (plain_up + 4 * size),
    }


def _table(rows: list[dict]) -> str:
    head = ("| sites | params | precision | ring | graph, t | dropped | site CPU s (mean / max) | server CPU s "
            "| plain server CPU s | site sends | site receives | upload × float32 | upload × plain at precision "
            "| total × float32 |")
    out = [head, "|" + "---|" * 14]
    for r in rows:
        out.append(
            f"| {r['sites']} | {r['params']:.0e} | {r['precision_bits']}-bit | Z_2^{r['ring_bits']} | {r['graph']}, {r['threshold']} | {len(r['dropped'])} "
            f"| {r['site_cpu_s']:.3f} / {r['site_cpu_max_s']:.3f} | {r['server_cpu_s']:.3f} | {r['plain_server_cpu_s']:.4f} "
            f"| {r['sent_B'] / 1e6:.3f} MB | {r['received_B'] / 1e3:.1f} kB | {r['upload_expansion']:.3f} "
            f"| {r['upload_vs_plain_at_precision']:.3f} | {r['total_expansion']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "secagg"))
    args = ap.parse_args(argv)
    plan = []
    if args.quick:
        plan = [(n, 10**5, 16, None, 0.0) for n in (3, 10)]
    else:
        plan += [(3, CASE_STUDY_PARAMS, 16, None, 0.0), (3, CASE_STUDY_PARAMS, 26, None, 0.0)]
        for size in (10**5, 10**6):
            for n in (3, 10, 50):
                plan.append((n, size, 16, None, 0.0))
            plan.append((50, size, 16, 2 * math.ceil(math.log2(50)), 0.0))
            plan.append((10, size, 26, None, 0.1))
        plan += [(3, 10**7, 16, None, 0.0), (10, 10**7, 16, None, 0.0)]
    rows = []
    for n, size, bits, nbrs, drop in plan:
        t0 = time.perf_counter()
        reps = args.repeats if size * n <= 10**7 * 3 else 1
        rows.append(_measure(n, size, bits=bits, neighbours=nbrs, drop_frac=drop, repeats=reps, seed=len(rows)))
        rows[-1]["repeats"] = reps
        print(f"  {n} sites, {size:.0e} params, {bits}-bit, graph {rows[-1]['graph']}: site CPU "
              f"{rows[-1]['site_cpu_s']:.3f}s, upload ×{rows[-1]['upload_expansion']:.3f} "
              f"({time.perf_counter() - t0:.0f}s wall)", file=sys.stderr, flush=True)
    import cryptography
    import torch

    env = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "cryptography": cryptography.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    target_row = next((r for r in rows if r["sites"] == 3 and r["precision_bits"] == 16 and r["params"] >= 10**5), rows[0])
    cs = next((r for r in rows if r["params"] == CASE_STUDY_PARAMS and r["precision_bits"] == 26), None)
    targets = {
        "communication_expansion_3_sites_16bit": {"vs_float32_upload": target_row["upload_expansion"],
                                                   "vs_16bit_plain_upload": target_row["upload_vs_plain_at_precision"],
                                                   "vs_float32_total": target_row["total_expansion"], "target": 2.0},
    }
    if cs is not None:
        targets["site_cpu_per_round_case_study_s"] = {"measured": cs["site_cpu_s"] + cs["server_cpu_s"] / cs["sites"],
                                                      "target_one_local_epoch_idle_s": CASE_STUDY_EPOCH_IDLE_S}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "rows": rows, "targets": targets}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out.with_suffix(".json"))
    md = (f"# Secure aggregation, per site per round (in-process; {env['cpu']}, {env['cpu_count']} cores, "
          f"load average {env['loadavg'][0]:.1f} at start of write — a shared, loaded machine)\n\n"
          f"numpy {env['numpy']}, cryptography {env['cryptography']}, torch {env['torch']} "
          f"({env['torch_threads']} threads; not used by the protocol). CPU = process time, median of the "
          f"repeats column in the JSON.\n\n" + _table(rows) + "\n\nTargets: " + json.dumps(targets) + "\n")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(out.with_suffix(".md"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
