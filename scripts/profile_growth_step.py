#!/usr/bin/env python
"""Where a growth allocation's time goes (CPU thread time, one thread), per training-loop part.

Trains the bench_overhead models (random-init GPT-2 6×512 / BERT 6×384, batch 4 × 64 tokens) with
a RankController at a constant budget that re-allocates (prune + grow) every ``--interval`` steps,
and reports the median CPU milliseconds of each part on plain steps and on growth steps, plus the
controller internals (arming the sketch capture, candidates from the sketches, input energies,
allocation, resizes). ``growth extra`` = growth step − plain step (+ the arming on the step before).

Examples:
    python scripts/profile_growth_step.py --model bert
    python scripts/profile_growth_step.py --smoke            # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import median  # noqa: E402
from bench_overhead import MODELS, build_model  # noqa: E402

import adarank.allocation.controller as controller_mod  # noqa: E402
from adarank.allocation import BudgetSchedule, RankController  # noqa: E402
from adarank.modules import add_adapters  # noqa: E402
from adarank.runs_io import dumps_strict  # noqa: E402


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def run(self, key: str, fn):
        t0 = time.thread_time()
        out = fn()
        self.times.setdefault(key, []).append(time.thread_time() - t0)
        return out

    def wrap(self, key: str, fn):
        return lambda *a, **k: self.run(key, lambda: fn(*a, **k))


def profile(model_kind: str, steps: int, interval: int, rank: int, smoke: bool) -> dict:
    """Run ``steps`` optimizer steps and return the per-part medians (ms) and counts."""
    model, regex = build_model(model_kind, smoke)
    layers = add_adapters(model, ["re:" + regex], rank, seed=0)
    budget = sum(la.live_params for la in layers.values())
    sched = BudgetSchedule(
        budget, 10 * steps, init_budget=budget, warmup_steps=2, final_steps=1, interval=interval
    )
    ctrl = RankController(layers, sched)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctrl.attach_optimizer(opt)
    timer = _Timer()
    patched = {  # controller internals, restored afterwards
        "candidates_from_sketch": controller_mod.candidates_from_sketch,
        "allocate": controller_mod.allocate,
    }
    controller_mod.candidates_from_sketch = timer.wrap(
        "candidates", patched["candidates_from_sketch"]
    )
    controller_mod.allocate = timer.wrap("allocate", patched["allocate"])
    ctrl._mean_input_energy = timer.wrap("input energy", ctrl._mean_input_energy)
    ctrl._resize = timer.wrap("resize + optimizer", ctrl._resize)
    ctrl._set_capture = timer.wrap("arm capture", ctrl._set_capture)
    timer.times["arm capture"] = []
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 16 if smoke else 64), generator=g)
    labels = ids if model_kind == "gpt2" else torch.randint(0, 2, (4,), generator=g)
    model.train()
    try:
        for step in range(1, steps + 1):
            kind = "growth" if sched.is_allocation_step(step) else "plain"
            loss = timer.run(f"{kind}: forward", lambda: model(input_ids=ids, labels=labels).loss)
            timer.run(f"{kind}: backward", loss.backward)
            timer.run(f"{kind}: observe", ctrl.observe)
            timer.run(f"{kind}: optimizer", opt.step)
            n_arm = len(timer.times["arm capture"])
            timer.run(f"{kind}: controller.step", lambda s=step: ctrl.step(s))
            # report arming (for the next step) on its own, not inside this step's controller time
            timer.times[f"{kind}: controller.step"][-1] -= sum(timer.times["arm capture"][n_arm:])
            opt.zero_grad(set_to_none=True)
    finally:
        controller_mod.candidates_from_sketch = patched["candidates_from_sketch"]
        controller_mod.allocate = patched["allocate"]
    arming = timer.times.pop("arm capture")
    # arming runs after every step; it only does work after the step before a growth step
    before_growth = [t for i, t in enumerate(arming, start=2) if sched.is_allocation_step(i)]
    timer.times["arm capture (before a growth step)"] = before_growth
    out = {"model": model_kind, "layers": len(layers), "steps": steps, "interval": interval}
    out["median_ms"] = {k: 1e3 * median(v[1:] or v) for k, v in sorted(timer.times.items())}
    out["calls"] = {k: len(v) for k, v in sorted(timer.times.items())}
    plain = sum(v for k, v in out["median_ms"].items() if k.startswith("plain"))
    growth = sum(v for k, v in out["median_ms"].items() if k.startswith("growth"))
    out["plain_step_ms"] = plain
    out["growth_extra_ms"] = growth - plain + out["median_ms"]["arm capture (before a growth step)"]
    out["amortised_overhead_at_interval_10"] = out["growth_extra_ms"] / 10 / plain
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=MODELS, default="bert")
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.interval = 9, 2
    torch.set_num_threads(1)
    res = profile(args.model, args.steps, args.interval, args.rank, args.smoke)
    width = max(len(k) for k in res["median_ms"])
    for key, ms in res["median_ms"].items():
        print(f"{key:{width}s}  {ms:8.2f} ms  (n={res['calls'][key]})")
    print(
        f"plain step {res['plain_step_ms']:.1f} ms; growth extra {res['growth_extra_ms']:.1f} ms "
        f"= {100 * res['amortised_overhead_at_interval_10']:.1f}% of a step at interval 10"
    )
    if args.json:
        Path(args.json).write_text(dumps_strict(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
