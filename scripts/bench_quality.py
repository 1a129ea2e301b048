#!/usr/bin/env python
"""Quality at equal parameter budget: adarank vs PEFT LoRA vs PEFT AdaLoRA (MiniLM, Rotten Tomatoes).

Reduced protocol (the full-length one, 10,808 snippets × 337 steps, is ~5 min per run on 2 cores;
this one is ~1 min on one thread):
pretrained MiniLM-L6, fresh-vs-rotten snippets, a fixed seeded subset of ``--n-train`` training and
``--n-val`` validation snippets, ``--max-length`` tokens, batch ``--batch-size``, one epoch, AdamW
(no weight decay) with 6% warm-up and linear decay, adapters on the 36 query/key/value/attention-
output/intermediate/output dense layers, classifier head trainable, scaling 1 for every method.

Budgets are LoRA ranks r (``--budgets 2,4,8``): the parameter budget is LoRA r's adapter count.
    * ``lora``    — PEFT LoRA rank r (lora_alpha = r);
    * ``adalora`` — PEFT AdaLoRA init_r = ⌈1.5 r⌉ → target_r = r (its budget counts ranks, so
      its final parameter count is whatever the rank pattern costs; reported);
    * ``adarank`` — SVDLoRALinear at rank ⌈1.5 r⌉, RankController with final budget = LoRA r's
      parameter count (cost-aware, may grow), same warm-up / final fractions and interval.

Learning rates are tuned per method on ``--lrs`` at the middle budget with seed 0 (best
validation accuracy); every budget × seed then runs at that method's best rate.

Examples:
    python scripts/bench_quality.py --part minilm --jsonl runs/bench_quality/minilm.jsonl
    python scripts/bench_quality.py --part planted --jsonl runs/bench_quality/planted.jsonl
    python scripts/bench_quality.py --report runs/bench_quality/minilm.jsonl
    python scripts/bench_quality.py --smoke            # tiny random BERT, seconds (CI)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    BERT_TARGET_REGEX,
    adalora_ranks,
    adalora_state_bytes,
    append_jsonl,
    effective_params,
    linear_dims,
    machine_info,
    planted_table,
    quality_table,
    read_jsonl,
    write_json,
)
from _bench_planted_peft import run_planted  # noqa: E402

from adarank.allocation import BudgetSchedule, RankController, replace_parameter  # noqa: E402
from adarank.allocation.controller import CONTROLLER_DEFAULTS  # noqa: E402
from adarank.modules import add_adapters, count_parameters  # noqa: E402

METHODS = ("adarank", "adarank-fixed", "lora", "adalora")


# ---------------------------------------------------------------------- data and model
def load_data(args) -> dict[str, torch.Tensor]:
    """Token ids, masks and labels of the fixed train/validation subsets."""
    if args.smoke:  # synthetic: label = whether low token ids dominate the snippet
        g = torch.Generator().manual_seed(0)
        n = args.n_train + args.n_val
        ids = torch.randint(5, 69, (n, args.max_length), generator=g)
        y = ((ids < 37).float().mean(1) > 0.5).long()
        mask = torch.ones_like(ids)
        tr, va = slice(0, args.n_train), slice(args.n_train, n)
        return {"tr": (ids[tr], mask[tr], y[tr]), "va": (ids[va], mask[va], y[va])}
    from transformers import AutoTokenizer

    from adarank.data.rotten_tomatoes import LABELS, load_rotten_tomatoes
    from adarank.models.hf import resolve_name_or_path

    texts, labels = load_rotten_tomatoes(download=False)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    pick = perm[: args.n_train + args.n_val]
    tok = AutoTokenizer.from_pretrained(resolve_name_or_path("minilm"))
    enc = tok(
        [texts[i] for i in pick],
        max_length=args.max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    y = torch.tensor([LABELS.index(labels[i]) for i in pick])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tr, va = slice(0, args.n_train), slice(args.n_train, len(pick))
    return {"tr": (ids[tr], mask[tr], y[tr]), "va": (ids[va], mask[va], y[va])}


def build_model(args, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)  # the fresh classifier head
    if args.smoke:
        cfg = BertConfig(
            vocab_size=80,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
        return AutoModelForSequenceClassification.from_config(cfg)
    from adarank.models.hf import resolve_name_or_path

    return AutoModelForSequenceClassification.from_pretrained(
        resolve_name_or_path("minilm"), num_labels=2
    )


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, int(mask.sum(1).max()))
    return ids[:, :length], mask[:, :length]


# ---------------------------------------------------------------------- one run
def run_one(args, data, method: str, r: int, lr: float, seed: int) -> dict:
    """Train one configuration for one epoch and return its record."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = build_model(args, seed)
    dims = linear_dims(model, BERT_TARGET_REGEX)
    lora_params = sum(r * (d_out + d_in) for d_out, d_in in dims.values())
    init_r = math.ceil(1.5 * r)
    ids, mask, y = data["tr"]
    steps = len(y) // args.batch_size
    warm, final = round(args.warmup_frac * steps), round(args.final_frac * steps)
    controller, peft_model = None, None
    if method in ("adarank", "adarank-fixed"):
        layers = add_adapters(
            model,
            ["re:" + BERT_TARGET_REGEX],
            _adarank_start_rank(args, r) if method == "adarank" else r,
            modules_to_save=["classifier"],
            seed=seed,
            scaling=args.adarank_scaling,
            factor_init=args.adarank_factor_init,
        )
        if args.adarank_relative_scaling:
            for layer in layers.values():
                spec = torch.linalg.matrix_norm(layer.base_weight.detach().float(), ord=2)
                layer.scaling = args.adarank_relative_scaling * float(spec)
        if args.adarank_init != "lora":
            from adarank.init import initialize_adapters

            cal = [
                dict(zip(("input_ids", "attention_mask"), _trim(ids[i : i + 16], mask[i : i + 16])))
                | {"labels": y[i : i + 16]}
                for i in range(0, 16 * args.init_batches, 16)
            ]
            initialize_adapters(
                model, args.adarank_init, cal, num_batches=args.init_batches, seed=seed
            )
        start_live = sum(la.live_params for la in layers.values())
        if method == "adarank":  # adarank-fixed: same layers at rank r, allocation off
            schedule = BudgetSchedule(
                final_budget=lora_params,
                total_steps=steps,
                init_budget=_adarank_init_budget(args, start_live, lora_params),
                warmup_steps=warm,
                final_steps=final,
                interval=args.interval,
            )
            controller = RankController(
                layers,
                schedule,
                scorer=args.adarank_scorer,
                retract=args.adarank_retract,
                denoise_growth=args.adarank_denoise_growth,
                grow=args.adarank_grow,
                max_delta_ratio=args.adarank_max_delta_ratio or None,
                seed=seed,
            )
            import adarank.allocation.controller as controller_module  # new slots' moments

            controller_module.replace_parameter = functools.partial(
                replace_parameter, second_moment=args.adarank_new_slot_moments
            )
        elif args.adarank_retract or args.adarank_max_delta_ratio:
            # adarank-fixed: no schedule (ranks never change), but the same per-step retraction
            # and trust region as adarank, so the pair isolates what allocation adds
            controller = RankController(
                layers,
                None,
                retract=args.adarank_retract,
                max_delta_ratio=args.adarank_max_delta_ratio or None,
                seed=seed,
            )
    elif method == "lora":
        cfg = LoraConfig(
            r=r, lora_alpha=r, target_modules=BERT_TARGET_REGEX, modules_to_save=["classifier"]
        )
        model = peft_model = get_peft_model(model, cfg)
    elif method == "adalora":
        cfg = AdaLoraConfig(
            init_r=init_r,
            target_r=r,
            lora_alpha=init_r,  # PEFT AdaLoRA scales by lora_alpha / init_r: 1, as the others
            tinit=warm,
            tfinal=final,
            deltaT=args.interval,
            total_step=steps,
            target_modules=BERT_TARGET_REGEX,
            modules_to_save=["classifier"],
        )
        model = peft_model = get_peft_model(model, cfg)
    else:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if "classifier" in n]
    groups = _adapter_groups(args, method, lr, [(n, p) for n, p in named if "classifier" not in n])
    groups.append({"params": head, "lr": args.head_lr} if args.head_lr else {"params": head})
    physical_start = physical_peak = _adapter_physical(model, method)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if controller is not None:
        controller.attach_optimizer(opt)
    warm_lr = max(1, round(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm_lr, max(0.0, (steps - s) / max(1, steps - warm_lr)))
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    model.train()
    losses, step_times, state_peak, trace = [], [], 0, []
    t_run = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx = order[(step - 1) * args.batch_size : step * args.batch_size]
        b_ids, b_mask = _trim(ids[idx], mask[idx])
        out = model(input_ids=b_ids, attention_mask=b_mask, labels=y[idx])
        loss = out.loss if controller is None else out.loss + controller.regularizer()
        loss.backward()
        if controller is not None:
            controller.observe()
        opt.step()
        sched.step()
        if controller is not None:
            controller.step(step)
        if method == "adalora":
            peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if args.trace_every and (step % args.trace_every == 0 or step == 1):
            trace.append({"step": step, **delta_stats(model, method)})
        losses.append(float(out.loss.detach()))
        step_times.append(time.perf_counter() - t0)
        state_peak = max(state_peak, _state_bytes(controller, peft_model, method))
        if controller is not None:  # the others never change their tensors' size
            physical_peak = max(physical_peak, _adapter_physical(model, method))
    train_s = time.perf_counter() - t_run
    acc = evaluate(model, data["va"])
    if method == "adarank":
        ranks = controller.ranks()
    elif method == "adalora":
        ranks = adalora_ranks(peft_model)
    else:
        ranks = dict.fromkeys(dims, r)
    return {
        "method": method,
        "budget_r": r,
        "param_budget": lora_params,
        "lr": lr,
        "seed": seed,
        "val_acc": acc,
        "train_loss_last": sum(losses[-20:]) / len(losses[-20:]),
        "losses": [round(v, 4) for v in losses],
        **run_config(args, method),
        "physical_params_start": physical_start,
        "physical_params_peak": physical_peak,  # the warm-up capacity (growth included)
        "physical_params_end": _adapter_physical(model, method),
        "effective_params_end": effective_params(ranks, dims) if method != "lora" else lora_params,
        "ranks": ranks,
        "steps": steps,
        "train_s": train_s,
        "step_s_median": sorted(step_times)[len(step_times) // 2],
        "alloc_s": controller.alloc_time_s if controller is not None else None,
        **(
            {
                "grown_total": sum(e.n_grown for e in controller.history),
                "pruned_total": sum(e.n_pruned for e in controller.history),
            }
            if controller is not None
            else {}
        ),
        "allocator_state_bytes": state_peak,
        **({"trace": trace} if trace else {}),
    }


@torch.no_grad()
def delta_stats(model: torch.nn.Module, method: str) -> dict:
    """How far the adapters moved the base: ‖ΔW‖₂ / ‖W0‖₂ per adapted layer (max, median) and
    the largest norm of a factor direction, unscaled (adarank: columns of P, rows of Q —
    orthonormal: 1; LoRA: columns of B, rows of A). ΔW from each method's own factors, through
    QR of the factors (exact, never the dense matrix).

    Records written before ``factor_norm_max`` existed carry ``factor_col_max``: the largest
    column of ``scaling · P · diag(λ)`` or row of Q — for adarank mostly ΔW's largest singular
    value, not the drift of the directions."""
    ratios, col = [], 0.0
    for module in model.modules():
        factors = _delta_factors(module, method)
        if factors is None:
            continue
        left, right, base, (cols, rows) = factors  # ΔW = left @ right
        if left.shape[1] == 0:
            ratios.append(0.0)
            continue
        col = max(col, float(cols.norm(dim=0).max()), float(rows.norm(dim=1).max()))
        r_l = torch.linalg.qr(left, mode="r")[1]
        r_r = torch.linalg.qr(right.T, mode="r")[1]
        spec = float(torch.linalg.matrix_norm(r_l @ r_r.T, ord=2))
        ratios.append(spec / float(torch.linalg.matrix_norm(base, ord=2)))
    ratios.sort()
    return {
        "dw_rel_max": round(ratios[-1], 4),
        "dw_rel_median": round(ratios[len(ratios) // 2], 4),
        "factor_norm_max": round(col, 4),
    }


def _delta_factors(module, method: str):
    """``(L, R, W0, (D_out, D_in))`` float64 with ΔW = L R for an adapted layer of ``method``,
    else None; ``D_out`` (d_out, r) and ``D_in`` (r, d_in) are the unscaled direction factors
    (adarank: P, Q; LoRA and AdaLoRA: B, A)."""
    if method.startswith("adarank"):
        from adarank.modules import SVDLoRALinear

        if not isinstance(module, SVDLoRALinear):
            return None
        P, lam, Q = (
            t.detach().double() for t in (module.lora_P, module.lora_lambda, module.lora_Q)
        )
        return module.scaling * P * lam, Q, module.base_weight.detach().double(), (P, Q)
    if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
        return None
    A, B = module.lora_A["default"], module.lora_B["default"]
    A = (A.weight if hasattr(A, "weight") else A).detach().double()  # (r, d_in)
    B = (B.weight if hasattr(B, "weight") else B).detach().double()  # (d_out, r)
    directions = (B, A)
    scale = float(module.scaling["default"])
    if method == "adalora":  # ΔW = B (A ⊙ E) · scaling / ranknum
        E = module.lora_E["default"].detach().double()
        A = A * E
        scale /= float(module.ranknum["default"]) + 1e-5
    return B * scale, A, module.base_layer.weight.detach().double(), directions


def _adapter_groups(args, method: str, lr: float, named) -> list[dict]:
    """Adapter parameter groups: λ at ``lr`` (with ``--adarank-lambda-wd``), P and Q at
    ``lr × --adarank-pq-lr-mult`` (LoRA+-style split of magnitudes and directions)."""
    if not method.startswith("adarank") or (
        args.adarank_pq_lr_mult == 1.0 and args.adarank_lambda_wd == 0.0
    ):
        return [{"params": [p for _, p in named]}]
    lam = [p for n, p in named if n.endswith("lora_lambda")]
    pq = [p for n, p in named if n.endswith(("lora_P", "lora_Q"))]
    other = [p for n, p in named if not n.endswith(("lora_lambda", "lora_P", "lora_Q"))]
    groups = [
        {"params": lam, "weight_decay": args.adarank_lambda_wd},
        {"params": pq, "lr": lr * args.adarank_pq_lr_mult},
    ]
    return groups + ([{"params": other}] if other else [])


def _state_bytes(controller, peft_model, method: str) -> int:
    """Allocation state kept between steps (its peak over the run is reported)."""
    if controller is not None:
        return controller.state_memory_bytes()
    return adalora_state_bytes(peft_model) if method == "adalora" else 0


def _adapter_physical(model: torch.nn.Module, method: str) -> int:
    if method.startswith("adarank"):
        return count_parameters(model)["adapter"]
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split, batch_size: int = 64) -> float:
    ids, mask, y = split
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        b_ids, b_mask = _trim(ids[i : i + batch_size], mask[i : i + batch_size])
        logits = model(input_ids=b_ids, attention_mask=b_mask).logits
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    model.train()
    return correct / len(y)


# ---------------------------------------------------------------------- protocol
PROTOCOL_KEYS = (
    "head_lr",
    "n_train",
    "n_val",
    "max_length",
    "batch_size",
    "interval",
    "warmup_frac",
    "final_frac",
)
ADARANK_KEYS = (
    "adarank_scorer",
    "adarank_scaling",
    "adarank_factor_init",
    "adarank_init",
    "adarank_init_ratio",
    "adarank_init_rank",
)


def _adarank_start_rank(args, r: int) -> int:
    """adarank's starting rank: ⌈ratio·r⌉, or the fixed --adarank-init-rank (what recipes ship)."""
    return args.adarank_init_rank or math.ceil(args.adarank_init_ratio * r)


def _adarank_init_budget(args, start_live: int, lora_params: int) -> int:
    """Warm-up budget: ratio × final; with a fixed start rank it is the recipes' rule
    (``AdaRankModule``: max(final, ratio × final), the first allocation prunes the excess)."""
    if (
        args.adarank_init_rank and args.adarank_smooth_start
    ):  # decay from what the layers start with
        return max(start_live, round(args.adarank_init_ratio * lora_params))
    if args.adarank_init_rank:
        return max(lora_params, round(args.adarank_init_ratio * lora_params))
    return max(start_live, int(args.adarank_init_ratio * lora_params))


#: later levers, stored only when not at their default (older records stay valid resume keys)
ADARANK_LEVERS = {
    "adarank_pq_lr_mult": 1.0,
    "adarank_lambda_wd": 0.0,
    "adarank_max_delta_ratio": 0.0,
    "adarank_smooth_start": False,
    "adarank_relative_scaling": 0.0,
    "adarank_grow": True,
}


#: records written before this setting existed ran with the value given here
LEGACY_DEFAULTS = {
    "adarank_new_slot_moments": "zero",
    "adarank_retract": False,
    "adarank_denoise_growth": False,
}


def run_config(args, method: str) -> dict:
    """The settings a record depends on beyond (method, budget, lr, seed); stored in it."""
    cfg = None
    if method.startswith("adarank"):
        cfg = {k: getattr(args, k) for k in ADARANK_KEYS}
        cfg |= {k: getattr(args, k) for k, d in ADARANK_LEVERS.items() if getattr(args, k) != d}
        cfg |= {k: getattr(args, k) for k in LEGACY_DEFAULTS}  # always stored
    return {"protocol": {k: getattr(args, k) for k in PROTOCOL_KEYS}, "adarank_config": cfg}


def _with_defaults(rec: dict) -> dict:
    """``rec`` with the adarank settings it does not store filled in (levers at their default,
    settings newer than the record at the value it ran with), for tables."""
    if rec.get("adarank_config") is None:
        return rec
    return rec | {"adarank_config": ADARANK_LEVERS | LEGACY_DEFAULTS | rec["adarank_config"]}


def _key(rec: dict) -> tuple:
    """Resume key: a record counts as done only for the same settings (json of its config)."""
    adarank = rec.get("adarank_config")
    if adarank is not None:
        adarank = LEGACY_DEFAULTS | adarank
    cfg = json.dumps({"protocol": rec.get("protocol"), "adarank_config": adarank}, sort_keys=True)
    return (rec["method"], rec["budget_r"], float(rec["lr"]), rec["seed"], cfg)


def run_minilm(args) -> list[dict]:
    """Tune lr per method (middle budget, seed 0), then every budget × seed at the best lr."""
    data = load_data(args)
    done = {_key(r): r for r in read_jsonl(args.jsonl)} if args.jsonl else {}
    records: dict[tuple, dict] = {}  # this invocation's runs only (the file may hold others)

    def go(method, r, lr, seed):
        spec = {"method": method, "budget_r": r, "lr": lr, "seed": seed}
        key = _key(spec | run_config(args, method))
        if key not in done:
            t0 = time.perf_counter()
            rec = run_one(args, data, method, r, lr, seed)
            rec["phase"] = "tune" if r == args.tune_budget and seed == 0 else "eval"
            print(
                f"[{time.strftime('%H:%M:%S')}] {method:8s} r={r} lr={lr:g} seed={seed} "
                f"acc={rec['val_acc']:.4f} eff={rec['effective_params_end']} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            done[key] = rec
            if args.jsonl:
                append_jsonl(args.jsonl, rec)
        records.setdefault(key, done[key])
        return done[key]

    if args.first_seed:  # a later part of the seeds, run beside the first (one lr: no tuning)
        best = dict.fromkeys(args.methods, args.lrs[0])
    else:
        best = {}
        for lr in args.lrs:  # interleave methods so load changes hit all of them alike
            for method in args.methods:
                go(method, args.tune_budget, lr, 0)
        for method in args.methods:
            tuned = [go(method, args.tune_budget, lr, 0) for lr in args.lrs]
            best[method] = max(tuned, key=lambda rec: rec["val_acc"])["lr"]
    print(f"best lr per method: {best}", flush=True)
    for seed in range(args.first_seed, args.seeds):
        for r in args.budgets:
            for method in args.methods:
                go(method, r, best[method], seed)
    return list(records.values())


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=["minilm", "planted", "all"], default="all")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="2,4,8", help="LoRA ranks defining the budgets")
    ap.add_argument("--tune-budget", type=int, default=4, help="budget (LoRA r) for lr tuning")
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning-rate grid")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds first-seed … seeds-1 only (no lr tuning: needs a single --lrs), so the "
        "seeds of one configuration can run in parallel processes",
    )
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--interval", type=int, default=5, help="re-allocation interval (steps)")
    ap.add_argument(
        "--adarank-scaling",
        type=float,
        default=16.0,
        help="adarank's ΔW scaling (16 = the shipped transformer configs; 1 = the earlier runs)",
    )
    ap.add_argument(
        "--adarank-factor-init",
        default="svd",
        choices=["svd", "lora"],
        help="adarank's factor init: svd (λ = 0, orthonormal P, Q) or lora (P = 0, λ = 1)",
    )
    ap.add_argument(
        "--adarank-init",
        default="lora",
        help="adarank init strategy (adarank.init: lora = the layer's own init, gradient, ...)",
    )
    ap.add_argument(
        "--adarank-init-ratio",
        type=float,
        default=1.5,
        help="adarank's starting budget / final budget (1.5 = AdaLoRA's init_r/target_r; 1 = "
        "start at the budget and only move ranks between layers)",
    )
    ap.add_argument(
        "--adarank-init-rank",
        type=int,
        default=None,
        help="start every adapted layer at this rank (the recipes ship 8) instead of ⌈ratio·r⌉; "
        "the warm-up budget is then ratio × the final budget, as in AdaRankModule",
    )
    ap.add_argument(
        "--adarank-scorer",
        default="energy",
        choices=["energy", "sensitivity", "magnitude"],
        help="adarank's importance score",
    )
    ap.add_argument(
        "--adarank-pq-lr-mult",
        type=float,
        default=1.0,
        help="learning rate of P and Q relative to λ's (LoRA+-style; 1 = one rate)",
    )
    ap.add_argument(
        "--adarank-lambda-wd",
        type=float,
        default=0.0,
        help="decoupled weight decay on λ only (AdamW bounds |λ| near 1/wd whatever the lr)",
    )
    ap.add_argument(
        "--trace-every",
        type=int,
        default=10,
        help="every N steps record ‖ΔW‖₂/‖W0‖₂ (max, median over layers) and the longest unscaled "
        "factor direction (P's columns, Q's rows) in the run's 'trace' (0: off)",
    )
    ap.add_argument(
        "--adarank-relative-scaling",
        type=float,
        default=0.0,
        help="α > 0: each layer's scaling is α·‖W0‖₂ (LARS-like: a unit of λ moves every layer "
        "by the same fraction of its base weight's spectral norm) instead of --adarank-scaling",
    )
    ap.add_argument(
        "--adarank-new-slot-moments",
        choices=("mean", "zero"),
        default="mean",
        help="Adam second moment of new triplets: the surviving slots' mean (the library's "
        "rule, adarank.allocation.optim_sync) or zero (the rule before session 5)",
    )
    ap.add_argument(
        "--adarank-smooth-start",
        action="store_true",
        help="with --adarank-init-rank: the warm-up budget is the starting parameter count (the "
        "cubic decay starts from it) instead of ratio × final (the first allocation prunes the "
        "excess at once)",
    )
    ap.add_argument(
        "--adarank-retract",
        action=argparse.BooleanOptionalAction,
        default=CONTROLLER_DEFAULTS["retract"],
        help="after each optimizer step, re-orthonormalise P, Q exactly (QR + SVD of the core): "
        "RankController(retract=...), the config's allocation.retract (default: the library's)",
    )
    ap.add_argument(
        "--adarank-denoise-growth",
        action=argparse.BooleanOptionalAction,
        default=CONTROLLER_DEFAULTS["denoise_growth"],
        help="score growth candidates by σ² − ν² (ν: the batch's gradient-noise floor) and drop "
        "those under it: RankController(denoise_growth=...) (default: the library's)",
    )
    ap.add_argument(
        "--adarank-grow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="growth candidates on (RankController(grow=...)); --no-adarank-grow: prune only",
    )
    ap.add_argument(
        "--adarank-max-delta-ratio",
        type=float,
        default=0.0,
        help="bound each layer's ‖ΔW‖₂ by this × ‖W0‖₂ after every step (0 = off): "
        "RankController(max_delta_ratio=...)",
    )
    ap.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of the classifier head (default: the method's lr)",
    )
    ap.add_argument("--init-batches", type=int, default=4, help="calibration batches of 16")
    ap.add_argument("--warmup-frac", type=float, default=0.1, help="allocation warm-up fraction")
    ap.add_argument("--final-frac", type=float, default=0.2, help="frozen final fraction")
    ap.add_argument("--planted-steps", type=int, default=3000)
    ap.add_argument("--planted-seeds", type=int, default=2)
    ap.add_argument("--jsonl", default=None, help="append each run here (resumable)")
    ap.add_argument("--json", default=None, help="write all results + machine info here")
    ap.add_argument("--report", default=None, help="print the tables of a JSONL file and exit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, seconds (CI)")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        ap.error(f"--methods {bad}: expected a subset of {list(METHODS)}")
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    if args.smoke:
        args.budgets, args.tune_budget, args.lrs = [2, 4], 2, [5e-3]
        args.seeds = args.first_seed + 1
        args.n_train, args.n_val, args.max_length, args.batch_size = 160, 64, 16, 16
        args.planted_steps, args.planted_seeds = 150, 1
    if args.tune_budget not in args.budgets:
        ap.error(f"--tune-budget {args.tune_budget} must be one of --budgets {args.budgets}")
    if not 0 <= args.first_seed < args.seeds:
        ap.error(f"--first-seed {args.first_seed}: expected 0 ≤ first-seed < --seeds {args.seeds}")
    if args.first_seed and len(args.lrs) != 1:
        ap.error(
            f"--first-seed {args.first_seed} skips the lr tuning: give one --lrs, not {args.lrs}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        recs = [_with_defaults(r) for r in read_jsonl(args.report)]
        print(quality_table([r for r in recs if "budget_r" in r]))
        print(planted_table([r for r in recs if "rank_recovery_error" in r]))
        return 0
    out = {"machine": machine_info(), "args": vars(args)}
    if args.part in ("minilm", "all"):
        out["minilm"] = run_minilm(args)
        print(quality_table(out["minilm"]))
    if args.part in ("planted", "all"):
        out["planted"] = run_planted(args)
        print(planted_table(out["planted"]))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
