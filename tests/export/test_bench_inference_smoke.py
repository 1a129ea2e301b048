"""``scripts/bench_inference.py --smoke`` runs and its variants agree (keeps the script alive)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inference.py"


@pytest.mark.slow
def test_bench_inference_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--rounds", "2"])
    assert set(result["latency_ms"]) >= {"base", "merged", "adarank (unmerged)"}
    assert len(result["mixed_ms"]) == 4
    assert max(result["max_abs_logit_diff"].values()) < 1e-5
    assert "| mixed/gather (1 forward) |" in capsys.readouterr().out
