#!/usr/bin/env python
"""Planted-rank benchmark: adaptive adarank vs a uniform fixed-rank baseline at the same budget.

Examples:
    python scripts/bench_planted.py --seeds 5 --json runs/bench_planted_default.json
    python scripts/bench_planted.py --dims 128,96,64,128,32,96,64,48,128,32,64,96 --seeds 5
    python scripts/bench_planted.py --smoke          # seconds, for CI

Both methods use the same layer code and seeds; the baseline has allocation off and the largest
uniform rank whose parameter count fits the budget (default budget: the planted parameter count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.models.planted import build_planted_task, parse_int_list
from adarank.models.planted_fit import fit_planted
from adarank.runs_io import dumps_strict

KEYS = (
    "method",
    "seed",
    "heldout_mse",
    "excess_mse",
    "ranks",
    "rank_recovery_error",
    "live_params",
    "param_budget",
    "wall_s",
    "alloc_s",
    "start_params",
    "allocator_state_bytes",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ranks", default="16,8,8,4,4,2,2,1,1,1,1,0", help="planted rank per module")
    ap.add_argument("--dims", default="64", help="one dimension or one per module")
    ap.add_argument("--input-cov", default="white", choices=["white", "spiked", "misaligned"])
    ap.add_argument(
        "--budget", type=int, default=None, help="final params (default: planted params)"
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--scorer", default="energy", choices=["energy", "sensitivity", "magnitude"])
    ap.add_argument("--no-grow", action="store_true", help="prune-only ablation")
    ap.add_argument(
        "--denoise-growth",
        action=argparse.BooleanOptionalAction,
        default=CONTROLLER_DEFAULTS["denoise_growth"],
        help="growth candidates scored above the batch-noise floor (default: the library's)",
    )
    ap.add_argument("--orth-reg", type=float, default=0.1, help="orthogonality regulariser gamma")
    ap.add_argument("--json", default=None, help="write the runs as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny, fast configuration (CI)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ranks = parse_int_list(args.ranks, "--ranks")
    if args.smoke:
        ranks, args.dims, args.seeds, args.steps = [4, 2, 1, 0], "16", 1, 200
    runs = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        task = build_planted_task(ranks, args.dims, input_cov=args.input_cov, seed=seed)
        for method in ("adaptive", "uniform"):
            res = fit_planted(
                task,
                method,
                budget=args.budget,
                steps=args.steps,
                lr=args.lr,
                scorer=args.scorer,
                grow=not args.no_grow,
                orth_reg=args.orth_reg,
                denoise_growth=args.denoise_growth,
                seed=seed,
            )
            row = {k: res[k] for k in KEYS}
            runs.append(row)
            print(
                f"seed {seed} {method:8s} heldout {row['heldout_mse']:.5f} excess "
                f"{row['excess_mse']:.5f} rank-err {row['rank_recovery_error']:.3f} params "
                f"{row['live_params']}/{row['param_budget']} ({row['wall_s']:.1f}s)",
                flush=True,
            )
    summary = summarize(runs)
    print(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        payload = {"args": vars(args), "summary": summary, "runs": runs, "torch": torch.__version__}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)), suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(dumps_strict(payload, indent=2))
        os.replace(tmp, args.json)
    return 0


def summarize(runs: list[dict]) -> dict:
    out = {}
    for method in ("adaptive", "uniform"):
        rows = [r for r in runs if r["method"] == method]
        errs = [r["rank_recovery_error"] for r in rows]
        out[method] = {
            "rank_recovery_error_mean": statistics.fmean(errs),
            "rank_recovery_error_max": max(errs),
            "heldout_mse_mean": statistics.fmean(r["heldout_mse"] for r in rows),
            "excess_mse_mean": statistics.fmean(r["excess_mse"] for r in rows),
        }
    a, u = out["adaptive"], out["uniform"]
    out["ratios"] = {
        "heldout_mse": a["heldout_mse_mean"] / u["heldout_mse_mean"],
        "excess_mse": a["excess_mse_mean"] / max(u["excess_mse_mean"], 1e-12),
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
