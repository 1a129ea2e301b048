#!/usr/bin/env python
"""Training-step overhead: adarank vs PEFT LoRA / AdaLoRA vs the frozen floor (CPU, one thread).

Configurations (same target modules, same parameter budget = PEFT LoRA r=8's adapter count):
    * ``adaptive``  — SVDLoRALinear at rank 12 + RankController (final budget = LoRA r=8's
      count, init 1.5×, cubic decay, growth on);
    * ``adaptive1x`` — SVDLoRALinear at rank 8 + RankController at a constant budget (init =
      final = LoRA r=8's count): ranks move between layers by prune + grow, the adapter never
      exceeds the budget;
    * ``fixed``     — SVDLoRALinear at rank 8, no controller (allocation off), with the
      statistics' capture hooks a controller installs;
    * ``nostats``   — as ``fixed`` without the capture hooks (profiling: the per-step (Qx)²
      statistics switched off);
    * ``lora``      — PEFT LoRA r=8;
    * ``adalora``   — PEFT AdaLoRA init_r=12 → target_r=8, ``update_and_allocate(step)`` after
      ``optimizer.step()`` and before ``zero_grad()``;
    * ``floor``     — frozen model forward+backward only (one scalar gain on the input embeddings
      is the only trainable parameter, so activation gradients flow through every layer).

Models: ``gpt2`` / ``bert`` (random-init 6-layer models, the default) and ``minilm`` (the
pretrained all-MiniLM-L6-v2 with a fresh 2-class head; a tiny random BERT under ``--smoke``).

Memory per step (``_bench_memory.py``): live-tensor bytes (params + grads + optimizer state +
activations saved for backward + the method's own buffers), the step's peak RSS and, on CUDA,
``max_memory_allocated``; summarised per phase of the budget schedule (warm-up before the first
allocation, decay, final after the final allocation) with adaptive / LoRA ratios of the totals
and of the adapter-attributable part (a configuration's figure minus ``floor``'s).

Each configuration runs in its own process (peak RSS is per process); rounds are interleaved
(the order rotates per round) and medians over rounds are reported with paired per-round ratios.
The schedule is short and dense (``--steps`` optimizer steps, warm-up 10%, final 20%, an
allocation every ``--interval`` steps), so the raw mean over-weights allocation steps; the
amortised figure ``steady + extra/interval`` is also given for interval 10.

Examples:
    python scripts/bench_overhead.py --json runs/bench_overhead/cpu.json
    python scripts/bench_overhead.py --models bert --rounds 5
    python scripts/bench_overhead.py --smoke          # tiny models, in-process, seconds (CI)
    python scripts/bench_overhead.py --models minilm --configs adaptive,adaptive1x,lora,floor \
        --steps 20 --interval 4 --rounds 2 --jsonl runs/bench_overhead/mem.jsonl  # memory/phase
    python scripts/bench_overhead.py --device cuda --precision bf16 --batch 32 --seq 256 \
        --json runs/bench_overhead/cuda_bf16.json     # GPU section: read the wall columns

On CUDA every step is bracketed by ``torch.cuda.synchronize()``, so the *wall* columns and ratios
are the GPU figures (the CPU-time columns only measure the host side); ``cuda_peak_bytes`` in the
JSON is ``torch.cuda.max_memory_allocated()``. ``--precision bf16`` runs the forward under
``torch.autocast(bfloat16)`` with fp32 weights and adapters for every configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    BERT_TARGET_REGEX,
    GPT2_TARGET_REGEX,
    adalora_ranks,
    adalora_state_bytes,
    append_jsonl,
    linear_dims,
    machine_info,
    read_jsonl,
    write_json,
)
from _bench_memory import MemoryRecorder, capture_tensors, phase_bounds, rss_bytes  # noqa: E402
from _bench_overhead_report import phase_stats, summarize  # noqa: E402

CONFIGS = ("adaptive", "adaptive1x", "fixed", "nostats", "lora", "adalora", "floor")
MODELS = ("gpt2", "bert", "minilm")
DEFAULT_MODELS = ("gpt2", "bert")


def build_model(kind: str, smoke: bool, seed: int = 0):
    """Random-init GPT-2-style (6 × 512) or BERT-style (6 × 384) model, or the pretrained MiniLM
    (``minilm``, fresh 2-class head); tiny random models when ``smoke``."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "minilm" and not smoke:
        from adarank.models.hf import resolve_name_or_path

        path = resolve_name_or_path("minilm")
        return BertForSequenceClassification.from_pretrained(path, num_labels=2), BERT_TARGET_REGEX
    layers, vocab = (2, 512) if smoke else (6, 8192)
    if kind == "gpt2":
        d = 64 if smoke else 512
        cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=8, n_positions=256)
        return GPT2LMHeadModel(cfg), GPT2_TARGET_REGEX
    if kind in ("bert", "minilm"):
        d = 48 if smoke else 384
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=6,
            intermediate_size=4 * d,
            num_labels=2,
        )
        return BertForSequenceClassification(cfg), BERT_TARGET_REGEX
    raise ValueError(f"model={kind!r}: expected one of {MODELS}")


def worker(
    model_kind: str,
    config: str,
    steps: int,
    batch: int,
    seq: int,
    interval: int,
    smoke: bool,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict:
    """Run one configuration and return its measurements (called in a fresh process).

    ``device="cuda"`` times each step with ``torch.cuda.synchronize()`` around it (the wall
    columns are then the figure: thread time only sees the host side) and records the peak CUDA
    memory; ``precision="bf16"`` runs forward and loss under ``torch.autocast(bfloat16)`` with fp32
    weights and adapters (the usual mixed-precision fine-tuning set-up), for every method alike.
    """
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from adarank.allocation import BudgetSchedule, RankController, install_capture
    from adarank.modules import add_adapters

    model, regex = build_model(model_kind, smoke)
    dims = linear_dims(model, regex)
    lora_params = sum(8 * (o + i) for o, i in dims.values())
    warm, final = max(1, round(0.1 * steps)), max(1, round(0.2 * steps))
    fan = model_kind == "gpt2"  # GPT-2 Conv1D stores weights as (d_in, d_out)
    controller = peft_model = layers = None
    if config in ("adaptive", "adaptive1x", "fixed", "nostats"):
        layers = add_adapters(model, ["re:" + regex], 12 if config == "adaptive" else 8, seed=0)
        if config == "fixed":  # the per-step (Qx)² statistics a controller's hooks record
            install_capture(layers)
        if config.startswith("adaptive"):
            start = sum(la.live_params for la in layers.values())
            sched = BudgetSchedule(
                lora_params,
                steps,
                init_budget=start if config == "adaptive" else lora_params,
                warmup_steps=warm,
                final_steps=final,
                interval=interval,
            )
            controller = RankController(layers, sched)
    elif config == "lora":
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=8, target_modules=regex, fan_in_fan_out=fan)
        )
    elif config == "adalora":
        cfg = AdaLoraConfig(
            init_r=12,
            target_r=8,
            lora_alpha=12,
            tinit=warm,
            tfinal=final,
            deltaT=interval,
            total_step=steps,
            target_modules=regex,
            fan_in_fan_out=fan,
        )
        model = peft_model = get_peft_model(model, cfg)
    elif config == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        gain = torch.nn.Parameter(torch.zeros(()))
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * (1 + gain))
        model.register_parameter("floor_gain", gain)
    else:
        raise ValueError(f"config={config!r}: expected one of {CONFIGS}")
    model.to(device)
    cuda = device.startswith("cuda")
    autocast = torch.autocast(
        device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    params = [p for p in model.parameters() if p.requires_grad]
    n_start = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    if controller is not None:
        controller.attach_optimizer(opt)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    data = [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(4)]
    cls = torch.randint(0, 2, (batch,), generator=g).to(device)
    model.train()
    rss_base = rss_bytes()
    rec = MemoryRecorder(
        device, phase_bounds(controller, lora_params, steps, warm, final, interval)
    )
    wall, cpu, kind, capture_peak, state_peak = [], [], [], 0, 0
    for step in range(1, steps + 1):
        ids = data[step % len(data)]
        caps = controller.capture.values() if controller is not None else ()
        capturing = any(cap.capturing for cap in caps)
        rec.start()
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        labels = ids if model_kind == "gpt2" else cls
        with rec.saving():
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            if controller is not None:
                loss = loss + controller.regularizer()
        rec.sample()
        loss.backward()
        held = [t for cap in caps for t in capture_tensors(cap)] if capturing else []
        rec.sample(held)  # the capture's own buffers (not the saved activations it views)
        capture_peak = max(capture_peak, sum(t.nbytes for t in held))
        del held
        if controller is not None:
            controller.observe()
        opt.step()
        a0, ac0 = time.perf_counter(), time.thread_time()  # accounting: not timed
        rec.measure(model, opt)
        acct, acct_cpu = time.perf_counter() - a0, time.thread_time() - ac0
        event = controller.step(step) if controller is not None else None
        if peft_model is not None:
            peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        sync()
        wall.append(time.perf_counter() - t0 - acct)
        cpu.append(time.thread_time() - c0 - acct_cpu)
        allocating = event is not None or (
            peft_model is not None and warm < step <= steps - final and step % interval == 0
        )
        kind.append("alloc" if allocating else ("capture" if capturing else "plain"))
        state_now = 0
        if controller is not None:
            state_now = controller.state_memory_bytes()
        elif peft_model is not None:
            state_now = adalora_state_bytes(peft_model)
        state_peak = max(state_peak, state_now)
        rec.stop(state_now)  # + the method's persistent allocation state
    if controller is not None:
        ranks, n_end = controller.ranks(), controller.live_params()
    elif peft_model is not None:
        ranks = adalora_ranks(peft_model)
        n_end = sum(r * (dims[n][0] + dims[n][1] + 1) for n, r in ranks.items())
    else:
        ranks, n_end = {}, n_start
    adapter_end_bytes = 4 * n_end
    out = {
        "model": model_kind,
        "config": config,
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "interval": interval,
        "wall_s": wall,
        "cpu_s": cpu,
        "kind": kind,
        "params_start": n_start,
        "params_end": n_end,
        "ranks": ranks,
        "lora_r8_params": lora_params,
        "alloc_s": controller.alloc_time_s if controller is not None else None,
        "state_bytes_peak": state_peak,
        "adapter_end_bytes": adapter_end_bytes,
        "capture_bytes_peak": capture_peak,
        "rss_train_delta_bytes": 0,  # below, from the run's peak
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": precision,
        **rec.fields(),
    }
    out["rss_train_delta_bytes"] = out["rss_peak_bytes"] - rss_base
    out["memory_by_phase"] = phase_stats(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {MODELS} (default: {','.join(DEFAULT_MODELS)}; "
        "--report: every model in the file)",
    )
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: wall time is the figure)")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: forward under torch.autocast(bfloat16), fp32 weights and adapters",
    )
    ap.add_argument("--json", default=None, help="write raw + summary results here")
    ap.add_argument("--jsonl", default=None, help="append each run here (partial results)")
    ap.add_argument("--report", default=None, help="summarise the runs of a JSONL file and exit")
    ap.add_argument("--smoke", action="store_true", help="tiny models, in-process (CI)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.rounds, args.steps, args.batch, args.seq, args.interval = 1, 12, 2, 16, 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    work = {"device": args.device, "precision": args.precision}
    if args.worker:
        res = worker(
            *args.worker, args.steps, args.batch, args.seq, args.interval, args.smoke, **work
        )
        print("RESULT " + json.dumps(res))
        return 0
    models = [m for m in (args.models or ",".join(MODELS)).split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for value, allowed, flag in ((models, MODELS, "--models"), (configs, CONFIGS, "--configs")):
        bad = sorted(set(value) - set(allowed))
        if bad:
            ap.error(f"{flag} {bad}: expected a subset of {list(allowed)}")
    if args.report:
        runs = read_jsonl(args.report)
        print(
            summarize(
                runs,
                [m for m in models if any(r["model"] == m for r in runs)],
                [c for c in configs if any(r["config"] == c for r in runs)],
            )["markdown"]
        )
        return 0
    if args.models is None:
        models = list(DEFAULT_MODELS)
    runs = []
    for rnd in range(args.rounds):
        for model_kind in models:
            shift = rnd % len(configs)
            for config in configs[shift:] + configs[:shift]:
                if args.smoke:  # in-process: seconds, no per-process memory isolation
                    res = worker(
                        model_kind,
                        config,
                        args.steps,
                        args.batch,
                        args.seq,
                        args.interval,
                        True,
                        **work,
                    )
                else:
                    res = _spawn(model_kind, config, args)
                res["round"] = rnd
                runs.append(res)
                if args.jsonl:
                    append_jsonl(args.jsonl, res)
                print(
                    f"round {rnd} {model_kind:4s} {config:8s} "
                    f"median step {sorted(res['wall_s'])[len(res['wall_s']) // 2]:.3f} s",
                    flush=True,
                )
    summary = summarize(runs, models, configs)
    print(summary["markdown"])
    if args.json:
        write_json(
            args.json,
            {"machine": machine_info(), "args": vars(args), "runs": runs, "summary": summary},
        )
    return 0


def _spawn(model_kind: str, config: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        model_kind,
        config,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--interval",
        str(args.interval),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {model_kind}/{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    sys.exit(main())
