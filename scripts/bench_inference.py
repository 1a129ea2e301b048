#!/usr/bin/env python
"""Inference benchmark: base vs merged vs unmerged adapters, and mixed-adapter batches.

Model: random-init BERT for sequence classification (default 6 layers, hidden 384, like MiniLM-L6),
adapters of rank 8 on query/key/value/attention-output/intermediate/output (36 layers).

Part 1 — latency of one forward of a (batch × seq) batch, ``torch.inference_mode``:
    base          the plain model
    merged        adarank export (ΔW folded in, SVDLoRALinear removed) — should equal base
    adarank       unmerged SVDLoRALinear layers (two thin extra matmuls per layer)
    peft          the same adapter exported to PEFT and loaded with PeftModel (if peft installed)
Part 2 — a batch whose examples use A different adapters (MultiAdapterModel):
    mixed/gather  one forward, factors gathered per example (bmm)
    mixed/group   one forward, rows grouped by adapter
    separate      A forwards, one per adapter on its own rows (set_active_adapter)
    merged copies A forwards on A merged models (A× the weights in memory; lower bound)

Rounds are interleaved (every variant once per round, order rotated) and medians reported.
Outputs of the variants are cross-checked (max |Δlogit|) before timing.

Usage::

    python scripts/bench_inference.py                 # full run (minutes on 1 CPU thread)
    python scripts/bench_inference.py --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from adarank.export import MultiAdapterModel, export_peft, merge_and_unwrap  # noqa: E402
from adarank.modules import adapter_layers, add_adapters, save_adapter  # noqa: E402
from adarank.runs_io import dumps_strict  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few rounds (CI)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4, help="adapters in the mixed batch")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.batch, args.seq = 2, 64, 2, 4, 16
        args.rounds, args.warmup, args.adapters = 5, 1, 2
    if args.batch % args.adapters:
        p.error(f"--batch {args.batch} must be a multiple of --adapters {args.adapters}")
    return args


def build_base(args, device):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(128, args.seq),
        num_labels=2,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval().to(device)


def adapted(base, rank: int, seed: int):
    model = copy.deepcopy(base)
    add_adapters(model, TARGETS, rank, modules_to_save=["classifier"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_lambda.copy_(0.05 * torch.randn(layer.rank, generator=g))
        model.classifier.weight.add_(
            0.1
            * torch.randn(model.classifier.weight.shape, generator=g).to(model.classifier.weight)
        )
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(variants: dict, rounds: int, warmup: int, device) -> dict[str, float]:
    """Interleaved timing; returns the median seconds per call of each variant."""
    names = list(variants)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                sync(device)
                t0 = time.perf_counter()
                variants[n]()
                sync(device)
                if r >= warmup:
                    times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    import transformers

    base = build_base(args, device)
    ids = torch.randint(
        1, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    ).to(device)
    ad = adapted(base, args.rank, seed=1)
    merged = merge_and_unwrap(ad)
    models = {"base": base, "merged": merged, "adarank (unmerged)": ad}
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    try:
        import peft

        export_peft(ad, tmp / "peft")
        models["peft (unmerged)"] = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), tmp / "peft"
        ).eval()
    except ImportError:
        pass
    with torch.inference_mode():
        ref = ad(input_ids=ids).logits
        check = {
            n: float((m(input_ids=ids).logits - ref).abs().max())
            for n, m in models.items()
            if n != "base"
        }
    lat = bench(
        {n: (lambda m=m: m(input_ids=ids)) for n, m in models.items()},
        args.rounds,
        args.warmup,
        device,
    )

    # ---- mixed-adapter batches
    A = args.adapters
    plan = [f"t{i % A}" for i in range(args.batch)]
    server = MultiAdapterModel(copy.deepcopy(base)).eval()
    per_adapter = {}
    for i in range(A):
        m = adapted(base, args.rank, seed=10 + i)
        save_adapter(m, tmp / f"t{i}")
        server.load_adapter(f"t{i}", tmp / f"t{i}")
        per_adapter[f"t{i}"] = merge_and_unwrap(m, inplace=True)
    rows = {
        n: torch.tensor([b for b, p in enumerate(plan) if p == n], device=device)
        for n in per_adapter
    }

    def separate():
        out = []
        for n, r in rows.items():
            server.set_active_adapter(n)
            out.append(server(input_ids=ids[r]).logits)
        server.set_active_adapter(None)
        return out

    def copies():
        return [per_adapter[n](input_ids=ids[r]).logits for n, r in rows.items()]

    def mixed(mode):
        server.router.mode = mode
        return server(input_ids=ids, adapter_ids=plan).logits

    with torch.inference_mode():
        want = torch.empty(args.batch, 2, device=device)
        for n, r in rows.items():
            want[r] = per_adapter[n](input_ids=ids[r]).logits
        check["mixed/gather"] = float((mixed("gather") - want).abs().max())
        check["mixed/group"] = float((mixed("group") - want).abs().max())
    mix = bench(
        {
            "mixed/gather (1 forward)": lambda: mixed("gather"),
            "mixed/group (1 forward)": lambda: mixed("group"),
            f"separate ({A} forwards)": separate,
            f"{A} merged copies ({A} forwards)": copies,
        },
        args.rounds,
        args.warmup,
        device,
    )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "command": "python scripts/bench_inference.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} cpus | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "setup": {
            k: getattr(args, k)
            for k in ("layers", "hidden", "batch", "seq", "rank", "adapters", "rounds", "threads")
        },
        "max_abs_logit_diff": check,
        "latency_ms": {n: 1e3 * t for n, t in lat.items()},
        "mixed_ms": {n: 1e3 * t for n, t in mix.items()},
    }
    try:
        import peft

        result["versions"]["peft"] = peft.__version__
    except ImportError:
        pass
    report(result, lat, mix, args.batch)
    if args.json:
        args.json.write_text(dumps_strict(result, indent=2))
    return result


def report(result: dict, lat: dict, mix: dict, batch: int) -> None:
    print(
        f"# {result['command']}\n# {result['date']} | {result['machine']}\n# {result['versions']}"
    )
    print(
        f"# setup {result['setup']}\n# max |Δlogit| vs reference: {result['max_abs_logit_diff']}\n"
    )
    print("| model | median ms / forward | ratio to base |\n|---|---|---|")
    for n, t in lat.items():
        print(f"| {n} | {1e3 * t:.2f} | {t / lat['base']:.3f} |")
    first = next(iter(mix.values()))
    print(
        "\n| mixed batch | median ms / batch | examples / s | time ratio to mixed/gather |\n|---|---|---|---|"
    )
    for n, t in mix.items():
        print(f"| {n} | {1e3 * t:.2f} | {batch / t:.0f} | {t / first:.2f} |")


if __name__ == "__main__":
    main()
