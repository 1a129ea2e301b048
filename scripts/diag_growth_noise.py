"""Is a growth candidate signal or minibatch noise? Measured on MiniLM (Rotten Tomatoes).

Trains the ``bench_quality.py`` adarank configuration (init rank 8, r = ``--budget``'s budget,
scaling 16, lr ``--lr``, retraction on, shipped allocation rules) for ``--steps`` steps, then, for
every adapted layer, compares three projected gradients ``G⊥ = (I − Π_P) G (I − Π_Q)``
(docs/theory.md, "The noise floor of candidates"):

* one batch of ``--batch-size`` snippets, as its two halves' mean ``(G_A + G_B) / 2`` — what a
  growth step sketches;
* the same halves' difference ``(G_A − G_B) / 2``: the mean gradient cancels, the sampling noise
  stays, with the same covariance as the batch's (pure noise);
* the mean gradient of ``--mean-batches`` further batches (noise shrunk by their square root).

If the first and second have the same top singular value, a candidate from one batch is noise.
Dense gradients are used (no sketching), so the comparison does not depend on the sketch.

Example (≈ 5 min on one CPU thread):
    python scripts/diag_growth_noise.py --json docs/data/diag_growth_noise.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quality as bq  # noqa: E402
from _bench_common import BERT_TARGET_REGEX, linear_dims  # noqa: E402

from adarank.allocation import BudgetSchedule, RankController, install_capture  # noqa: E402
from adarank.allocation.growth import _orth_basis, _project_off  # noqa: E402
from adarank.modules import add_adapters  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps before measuring")
    ap.add_argument("--budget", type=int, default=8, help="LoRA rank r of the parameter budget")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32, help="even: split into two halves")
    ap.add_argument("--mean-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the per-layer figures here")
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, seconds (CI)")
    args = ap.parse_args(argv)
    if args.batch_size < 2 or args.batch_size % 2:
        ap.error(f"--batch-size={args.batch_size}: expected an even number ≥ 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = ["--part", "minilm", "--n-train", "10808", "--n-val", "2000", "--max-length", "64"]
    if args.smoke:  # 160 synthetic snippets: 20 batches of 8
        bench = ["--smoke"]
        args.batch_size, args.steps, args.mean_batches = (
            8,
            min(args.steps, 5),
            min(args.mean_batches, 4),
        )
    bargs = bq.parse_args(bench)
    data = bq.load_data(bargs)
    ids, mask, y = data["tr"]
    steps_total = len(y) // args.batch_size
    need = args.steps + 1 + args.mean_batches
    if need > steps_total:
        raise SystemExit(f"--steps + 1 + --mean-batches = {need} batches exceed the {steps_total}")
    model = bq.build_model(bargs, args.seed)
    dims = linear_dims(model, BERT_TARGET_REGEX)
    final = sum(args.budget * (a + b) for a, b in dims.values())
    layers = add_adapters(
        model, ["re:" + BERT_TARGET_REGEX], 8, modules_to_save=["classifier"], seed=args.seed
    )
    schedule = BudgetSchedule.from_fractions(final, steps_total)
    ctl = RankController(layers, schedule, seed=args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    opt.param_groups[0]["weight_decay"] = 0.0
    ctl.attach_optimizer(opt)
    warm = max(1, round(0.06 * steps_total))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps_total - s) / (steps_total - warm)))
    )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    bs = args.batch_size

    def batch(i, part=slice(None)):
        idx = order[i * bs : (i + 1) * bs][part]
        b_ids, b_mask = bq._trim(ids[idx], mask[idx])
        return {"input_ids": b_ids, "attention_mask": b_mask, "labels": y[idx]}

    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**batch(step - 1)).loss
        loss.backward()
        ctl.observe()
        opt.step()
        lr_sched.step()
        ctl.step(step)
        opt.zero_grad(set_to_none=True)
    trained_loss = float(loss.detach())
    ctl.close()
    caps = install_capture(layers, stats=False, max_tokens=None)

    def grads(i, part=slice(None)):
        for cap in caps.values():
            cap.capture_gradient(True)
        model(**batch(i, part)).loss.backward()
        model.zero_grad(set_to_none=True)
        return {n: cap.captured_grad.double().clone() for n, cap in caps.items()}

    t = args.steps
    g_a, g_b = grads(t, slice(0, None, 2)), grads(t, slice(1, None, 2))
    mean = None
    for j in range(1, args.mean_batches + 1):
        g = grads(t + j)
        mean = g if mean is None else {n: mean[n] + g[n] for n in g}
    rows = []
    for name, layer in layers.items():
        up = _orth_basis(layer.lora_P.detach().double())
        vq = _orth_basis(layer.lora_Q.detach().double().T)

        def top(m, up=up, vq=vq):
            return float(
                torch.linalg.svdvals(_project_off(_project_off(m, up, "left"), vq, "right"))[0]
            )

        rows.append(
            {
                "layer": name,
                "rank": layer.rank,
                "batch": top((g_a[name] + g_b[name]) / 2),
                "noise": top((g_a[name] - g_b[name]) / 2),
                "mean": top(mean[name] / args.mean_batches),
            }
        )
    ratios = [r["noise"] / r["batch"] for r in rows]
    means = [r["mean"] / r["batch"] for r in rows]
    summary = {
        "steps": args.steps,
        "budget_r": args.budget,
        "lr": args.lr,
        "batch_size": bs,
        "mean_batches": args.mean_batches,
        "seed": args.seed,
        "train_loss": trained_loss,
        "live_params": ctl.live_params(),
        "noise_over_batch": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
        "mean_over_batch_median": statistics.median(means),
        "layers": rows,
    }
    print("| layer | rank | σ₁ one batch | σ₁ noise (half difference) | σ₁ mean of batches |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['rank']} | {r['batch']:.3g} | {r['noise']:.3g} | {r['mean']:.3g} |"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
