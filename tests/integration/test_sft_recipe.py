"""The ``sft`` recipe end to end on a tiny random Llama: fit, evaluate, export, reload.

The real SmolLM2 run of the recipe is the slow test at the bottom (minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adarank.cli import main
from adarank.lightning.generation import greedy_generate

TINY = [
    "model.name_or_path=tiny-llama",
    "data.max_length=512",  # the byte-level tokenizer spends one token per character
    "data.max_train_examples=96",
    "data.val_size=16",
    "adapter.budget=20000",
    "schedule.interval=2",
    "trainer.max_steps=8",
    "trainer.val_check_interval=8",
    "trainer.enable_progress_bar=false",
    "callbacks.generation.num_examples=8",
    "callbacks.generation.num_samples=4",
    "callbacks.snapshot_every_n_steps=0",
    "logger.wandb=false",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sft") / "run"
    assert main(["fit", "sft", *TINY, f"run.dir={run}"]) == 0
    return run


def test_sft_summary_reports_base_and_tuned_metrics(sft_run: Path):
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["status"] == "ok"
    metrics = summary["metrics"]
    for key in ("val/loss", "val/ppl", "val/answer_acc", "base/val/loss", "base/val/answer_acc"):
        assert key in metrics, key
        assert 0 <= metrics[key] < float("inf")
    assert 0.0 <= metrics["val/answer_acc"] <= 1.0
    assert summary["adapter_params"] <= summary["param_budget"] == 20000
    assert metrics["val/loss"] < metrics["base/val/loss"], "8 steps lower the response loss"


def test_sft_samples_hold_base_and_tuned_rows(sft_run: Path):
    rows = [json.loads(line) for line in (sft_run / "samples.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in rows]
    assert stages == ["base"] * 4 + ["tuned"] * 4
    assert {r["step"] for r in rows if r["stage"] == "tuned"} == {8}
    for r in rows:
        assert "### Response:" in r["prompt"]  # tiny-llama has no chat template: plain template
        assert r["reference"] in ("positive", "negative")
        assert isinstance(r["generated"], str) and isinstance(r["correct"], bool)


def _greedy(model, run, n: int = 6) -> list[list[int]]:
    """Eight greedy tokens per prompt, no stop token (a random model may stop at once)."""
    data = run.build_data()
    examples = data.generation_examples(n)
    out = greedy_generate(
        model,
        [e["prompt_ids"] for e in examples],
        pad_id=int(data.tokenizer.pad_token_id),
        stop_ids=[-1],
        max_new_tokens=8,
    )
    assert all(len(ids) == 8 for ids in out)
    return out


def test_sft_merged_and_peft_exports_generate_the_same_text(sft_run: Path, tmp_path: Path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from adarank.models import build_hf_model
    from adarank.runs import load_run

    run = load_run(sft_run)
    with torch.no_grad():  # the adapter moved the model: otherwise the test proves nothing
        probe = torch.arange(40).reshape(2, 20) + 5
        base = build_hf_model("tiny-llama", task="causal_lm", seed=0)
        assert not torch.allclose(base(input_ids=probe).logits, run.model(input_ids=probe).logits)
    reference = _greedy(run.model, run)
    for fmt in ("merged", "peft"):
        assert main(["export", str(sft_run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert _greedy(merged, run) == reference
    via_peft = peft.PeftModel.from_pretrained(
        build_hf_model("tiny-llama", task="causal_lm", seed=0), tmp_path / "peft"
    ).eval()
    assert _greedy(via_peft, run) == reference
