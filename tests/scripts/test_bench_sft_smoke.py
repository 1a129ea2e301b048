"""Smoke run of ``scripts/bench_sft.py`` (tiny random Llama, three methods, one budget)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_per_example_losses(bench, records: dict) -> None:
    """Per-example losses add up to ``val_loss``; the paired difference against a direct
    computation: mean of the differences over tokens, SE = sd · √N / tokens."""
    for r in records.values():
        n = len(r["val_example_loss"])
        assert n == len(r["val_example_tokens"]) == r["protocol"]["n_val"]
        assert sum(r["val_example_loss"]) / sum(r["val_example_tokens"]) == pytest.approx(
            r["val_loss"], rel=1e-6
        )
    a, b = records["adarank"], records["lora"]
    d, se, n = bench.paired_difference(a, b)
    diffs = torch.tensor(a["val_example_loss"], dtype=torch.float64) - torch.tensor(
        b["val_example_loss"], dtype=torch.float64
    )
    tokens = sum(a["val_example_tokens"])
    assert d == pytest.approx(a["val_loss"] - b["val_loss"], abs=1e-6)
    assert se == pytest.approx(float(diffs.std()) * n**0.5 / tokens, rel=1e-9)
    with pytest.raises(ValueError, match="same protocol and seed"):
        bench.paired_difference(a, b | {"seed": 1})


def test_bench_sft_smoke_records_every_method_at_the_budget(tmp_path, capsys):
    bench = _load("bench_sft")
    jsonl = tmp_path / "sft.jsonl"
    assert bench.main(["--smoke", "--jsonl", str(jsonl)]) == 0
    records = bench.read_jsonl(jsonl)
    assert sorted(r["method"] for r in records) == ["adalora", "adarank", "lora"]
    budget = records[0]["param_budget"]
    # LoRA r=2 on tiny-llama's 14 matrices: 2 * sum(d_in + d_out), computed from the shapes
    from adarank.models import build_hf_model

    model = build_hf_model("tiny-llama", task="causal_lm")
    dims = bench._linear_dims(model)
    assert len(dims) == 14
    assert budget == 2 * sum(a + b for a, b in dims.values())
    by = {r["method"]: r for r in records}
    assert by["lora"]["adapter_params_end"] == budget
    assert by["adarank"]["adapter_params_end"] <= budget
    assert by["adarank"]["trainable_params_peak"] > by["adarank"]["adapter_params_end"]
    for r in records:
        assert r["val_loss"] > 0 and 0.0 <= r["answer_acc"] <= 1.0
        assert len(r["losses"]) == 6 and r["peak_rss_mb"] > 0
    _check_per_example_losses(bench, by)
    assert "− lora at r = 2" in capsys.readouterr().out  # the paired comparison is reported
    # resumable: a second call runs nothing new and reports the same table
    assert bench.main(["--smoke", "--jsonl", str(jsonl)]) == 0
    assert len(bench.read_jsonl(jsonl)) == 3
    from adarank.allocation.controller import CONTROLLER_DEFAULTS

    shipped = (
        "adarank"
        + ("+retract" if CONTROLLER_DEFAULTS["retract"] else "")
        + ("+denoise" if CONTROLLER_DEFAULTS["denoise_growth"] else "")
    )
    assert f"| {shipped} | 2 |" in capsys.readouterr().out
    # the retraction is a variant of its own: a new record, factors orthonormal at the end
    other = "false" if CONTROLLER_DEFAULTS["retract"] else "true"
    argv = ["--smoke", "--methods", "adarank", "--adarank-retract", other, "--jsonl", str(jsonl)]
    assert bench.main(argv) == 0
    records = bench.read_jsonl(jsonl)
    assert len(records) == 4
    flags = [r["adarank_retract"] for r in records if r["method"] == "adarank"]
    assert sorted(flags) == [False, True]
    label = (
        "adarank"
        + ("+retract" if other == "true" else "")
        + ("+denoise" if CONTROLLER_DEFAULTS["denoise_growth"] else "")
    )
    assert f"| {label} | 2 |" in capsys.readouterr().out  # this invocation's run, by variant


def test_bench_sft_example_losses_match_the_causal_lm_task():
    """Per-example sums from the benchmark's own forward equal the library's token-weighted
    ``causal_lm`` loss over the same batch (a reference computed another way)."""
    bench = _load("bench_sft")
    from adarank.lightning.tasks import run_task
    from adarank.models import build_hf_model

    args = bench.parse_args(["--smoke"])
    data = bench._data(args, seed=0)
    model = build_hf_model(args.model, task="causal_lm", seed=0).eval()
    batch = next(iter(data.val_dataloader()))
    sums, counts = bench._example_losses(model, batch)
    with torch.no_grad():
        out = run_task("causal_lm", model, batch)
    assert sum(counts) == out.weight and len(sums) == batch["input_ids"].shape[0]
    assert sum(sums) / sum(counts) == pytest.approx(float(out.loss), rel=1e-5)
