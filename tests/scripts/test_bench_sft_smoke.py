"""Smoke run of ``scripts/bench_sft.py`` (tiny random Llama, three methods, one budget)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    # resumable: a second call runs nothing new and reports the same table
    capsys.readouterr()
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
