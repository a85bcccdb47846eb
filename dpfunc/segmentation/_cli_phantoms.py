"""``dpfunc make-phantoms --out DIR --patients N --seed S``: an MSD-layout folder of CT phantoms."""

from __future__ import annotations

import argparse

from dpfunc._argtypes import int_at_least as _int_at_least

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "make-phantoms",
        help="write synthetic CT phantoms (liver labels) in the Medical Segmentation Decathlon layout",
        description="Writes DIR/dataset.json, DIR/imagesTr/liver_<p>.nii.gz and DIR/labelsTr/liver_<p>.nii.gz: "
                    "CT-like phantom volumes (body, liver-like organ, other structures, noise), a pure function of "
                    "--seed. For demonstrating the pipeline only: phantom results say nothing about clinical accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (must not hold a dataset.json yet)")
    p.add_argument("--patients", type=_int_at_least("--patients", 1), default=40, help="number of patients")
    p.add_argument("--seed", type=int, default=0, help="root of the phantom keys (0 is valid)")
    p.add_argument("--size", type=_int_at_least("--size", 16), default=128, help="in-plane pixels per side")
    p.add_argument("--slices", type=_int_at_least("--slices", 4), default=24, help="axial slices per volume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from dpfunc.segmentation._phantoms import make_phantoms

    out = make_phantoms(args.out, patients=args.patients, seed=args.seed, size=args.size, slices=args.slices)
    print(f"wrote {args.patients} phantom patients ({args.size}×{args.size}×{args.slices}, seed {args.seed}) to {out}")
    return 0
