#!/usr/bin/env python
"""Helpers of ``scripts/gpu_check.sh`` (one subcommand per step; see that script).

peak OUT.json ADARANK_ARGS...   run ``adarank ADARANK_ARGS``; write rc and the peak GPU memory
save-smollm2 DIR                save the built-in SmolLM2 (bf16) as a model directory
compare RUN MERGED OUT.json     unmerged quantized run vs its merged export: logit gap, top-1
table OUT WORK BNB SHARDED S    print the markdown table and write OUT/gpu_check.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH_NAMES = {
    "adaptive": "adarank adaptive",
    "fixed": "adarank fixed rank",
    "lora": "PEFT LoRA r=8",
    "adalora": "PEFT AdaLoRA",
    "floor": "frozen floor (no adapter)",
}
PHASE_NAMES = {"warmup": "warm-up", "decay": "decay", "final": "final"}
HEADER = ["check", "result", "time", "peak GPU memory", "adapter params", "notes"]


def peak(out: str, *args: str) -> int:
    """``adarank ARGS``; writes ``{"rc", "peak_bytes"}`` (``torch.cuda.max_memory_allocated``)."""
    import torch

    from adarank.cli import main

    code = main(list(args))
    used = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(out).write_text(json.dumps({"rc": code, "peak_bytes": used}))
    return code


def save_smollm2(directory: str) -> int:
    """The GGUF built-in as a bf16 model directory (bitsandbytes quantizes those on load)."""
    from adarank.models import build_hf_model, build_tokenizer

    build_hf_model("smollm2", task="causal_lm", dtype="bfloat16").save_pretrained(directory)
    build_tokenizer("smollm2").save_pretrained(directory)
    return 0


def compare(run_dir: str, merged_dir: str, out: str) -> int:
    """Logits of the run's (quantized, unmerged) model vs its merged export, on 16 prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from adarank.runs import load_run

    run = load_run(run_dir)
    model = run.model.eval()
    texts = [
        "Is the following movie review positive or negative? Review: film number "
        f"{i} was {'wonderful' if i % 2 else 'dreadful'}"
        for i in range(16)
    ]
    batch = run.tokenizer(texts, return_tensors="pt", padding=True).to("cuda")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = model(**batch).logits.float()
        got = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    res = {
        "max_abs_diff": (got - ref).abs()[mask].max().item(),
        "max_abs_logit": ref.abs()[mask].max().item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1))[mask].float().mean().item(),
    }
    Path(out).write_text(json.dumps(res))
    print(res)
    return 0


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def _bench_rows(out: Path, status: Any) -> list[list[str]]:
    bench = _load(out / "overhead.json")
    if bench is None:
        return [["bf16 step time vs PEFT LoRA / AdaLoRA", status("overhead"), "–", "–", "–", ""]]
    rows = []
    for run in bench.get("runs", []):
        steps = run["wall_s"][3:] or run["wall_s"]  # the first steps warm the kernels up
        rows.append(
            [
                f"bf16 step, {BENCH_NAMES.get(run['config'], run['config'])} "
                f"({run['model']}, batch {run['batch']}×{run['seq']})",
                "ok",
                f"{1000 * statistics.median(steps):.1f} ms/step",
                _mib(run.get("cuda_peak_bytes")),
                f"{run['params_end']:,}",
                f"equal parameters: PEFT LoRA r=8 has {run['lora_r8_params']:,}",
            ]
        )
    return rows + _memory_rows(bench)


def _memory_rows(bench: dict) -> list[list[str]]:
    """adaptive / PEFT LoRA ratio of the per-step CUDA peak, per schedule phase (median over
    the phase's steps, max in parentheses); the adapter part subtracts the ``floor`` run."""
    rows = []
    for model, mem in (bench.get("summary", {}).get("memory") or {}).items():
        ratios = mem.get("ratios", {}).get("adaptive/lora", {})

        def cells(key: str, ratios: dict = ratios) -> str:
            return ", ".join(
                f"{PHASE_NAMES.get(ph, ph)} {r[key + '_median']:.3f}× ({r[key + '_max']:.3f}×)"
                for ph, r in ratios.items()
                if key + "_median" in r
            )

        if not cells("cuda"):
            continue
        adapter = cells("cuda_adapter") or "– (no floor run)"
        rows.append(
            [
                f"bf16 peak memory per step by phase, adaptive / PEFT LoRA ({model})",
                "ok",
                "–",
                cells("cuda"),
                "–",
                f"adapter part (minus floor): {adapter}; targets ≤ 1.1× in the warm-up, "
                "≤ 1.0× after the final allocation",
            ]
        )
    return rows


def _sft_row(name: str, label: str, out: Path, work: Path, status: Any) -> list[str]:
    summary = _load(work / name / "summary.json")
    used = (_load(work / f"{name}.peak.json") or {}).get("peak_bytes")
    if summary is None:
        return [label, status(name), "–", _mib(used), "–", ""]
    metrics = summary.get("metrics", {})
    note = f"val/answer_acc {metrics.get('val/answer_acc', float('nan')):.3f}"
    if "base/val/answer_acc" in metrics:
        note += f" (base model {metrics['base/val/answer_acc']:.3f})"
    if name == "sft_4bit":
        cmp = _load(out / "compare_4bit.json")
        note += "; merged export vs unmerged: " + (
            f"max |Δlogit| {cmp['max_abs_diff']:.3g} (max |logit| {cmp['max_abs_logit']:.3g}), "
            f"top-1 agreement {cmp['top1_agreement']:.4f}"
            if cmp
            else status("export_4bit") + " / " + status("compare_4bit")
        )
    return [
        label,
        str(summary.get("status", "?")),
        f"{summary.get('wall_s', 0):.0f} s / {summary.get('steps', '?')} steps",
        _mib(used),
        f"{summary.get('adapter_params', 0):,}",
        note,
    ]


def table(out_dir: str, work_dir: str, bnb: str, sharded: str, total_s: str) -> int:
    """Print the check's markdown table and write it to ``OUT/gpu_check.md``."""
    out, work = Path(out_dir), Path(work_dir)

    def status(name: str) -> str:
        path = work / "status" / name
        return path.read_text().strip() if path.exists() else "not run"

    rows = _bench_rows(out, status)
    rows.append(_sft_row("sft_bf16", "sft recipe, bf16 base (SmolLM2-135M)", out, work, status))
    label = "sft recipe, 4-bit NF4 base (model.quantization=4bit)"
    if bnb == "ok":
        rows.append(_sft_row("sft_4bit", label, out, work, status))
    else:
        rows.append([label, bnb, "–", "–", "–", ""])
    rows.append(["sharded strategy on one device", "skipped", "–", "–", "–", sharded])
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + f"\n\nTotal wall time of the check: {total_s} s.\n"
    (out / "gpu_check.md").write_text(text)
    print("\n" + text)
    return 0


COMMANDS = {"peak": peak, "save-smollm2": save_smollm2, "compare": compare, "table": table}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} ARGS... (see the docstring)")
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
