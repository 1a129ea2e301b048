#!/usr/bin/env python
"""Do a causal-LM run's exports generate what the trained model generates?

For a run directory written by ``adarank fit`` on instruction data (e.g. the ``sft`` recipe):
rebuild the trained model (``load_run``), export it merged and as PEFT (``adarank export``),
reload both the way a user would (``AutoModelForCausalLM.from_pretrained`` and
``PeftModel.from_pretrained`` on the same base), and compare on ``--n`` validation prompts: the
greedy tokens (``--max-new-tokens``, no stop token) and the logits of the prompts. Prints and
optionally writes a JSON record.

Example:
    python scripts/check_export_llm.py runs/sft --n 32 --json docs/data/sft_export_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _greedy(model, prompts, pad_id: int, steps: int) -> list[list[int]]:
    from adarank.lightning.generation import greedy_generate

    return greedy_generate(model, prompts, pad_id=pad_id, stop_ids=[-1], max_new_tokens=steps)


@torch.no_grad()
def _prompt_logits(model, prompts) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


def check(run_dir: Path, n: int, max_new_tokens: int, out_dir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adarank.cli import main as cli
    from adarank.config.build import build_model
    from adarank.runs import load_run

    run = load_run(run_dir)
    data = run.build_data()
    examples = data.generation_examples(n)
    prompts = [e["prompt_ids"] for e in examples]
    pad = int(data.tokenizer.pad_token_id)
    ref_tokens = _greedy(run.model, prompts, pad, max_new_tokens)
    ref_logits = _prompt_logits(run.model, prompts[:4])
    record: dict = {"run_dir": str(run_dir), "prompts": len(prompts), "tokens": max_new_tokens}
    for fmt in ("merged", "peft"):
        target = out_dir / fmt
        if cli(["export", str(run_dir), "--format", fmt, "--out", str(target)]) != 0:
            raise SystemExit(f"adarank export --format {fmt} failed")
        if fmt == "merged":
            model = AutoModelForCausalLM.from_pretrained(target).eval()
        else:
            base = build_model(run.config)  # the same base, rebuilt from the run's config
            model = PeftModel.from_pretrained(base, target).eval()
        t0 = time.perf_counter()
        tokens = _greedy(model, prompts, pad, max_new_tokens)
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(_prompt_logits(model, prompts[:4]), ref_logits)
        )
        record[fmt] = {
            "same_greedy_tokens": f"{same}/{len(prompts)}",
            "max_abs_logit_diff_4_prompts": diff,
            "max_abs_logit": max(float(x.abs().max()) for x in ref_logits),
            "generate_s": round(time.perf_counter() - t0, 1),
        }
        print(fmt, record[fmt], flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=32, help="validation prompts")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        record = check(args.run_dir, args.n, args.max_new_tokens, Path(tmp))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
