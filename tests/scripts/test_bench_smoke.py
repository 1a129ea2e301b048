"""Smoke runs of the benchmark scripts (``--smoke``: tiny random models, seconds) so they never rot.

The figures are checked against values computed independently from the model shapes: parameter
counts of each configuration, PEFT AdaLoRA's allocator state (three buffers the size of its
adapter), the gradient-capture transient, the rank budgets each method must land on.
"""

from __future__ import annotations

import importlib.util
import json
import math
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


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    bench = _load("bench_overhead")
    out = tmp_path_factory.mktemp("overhead") / "o.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    return bench, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    bench = _load("bench_quality")
    out = tmp_path_factory.mktemp("quality") / "q.json"
    jsonl = out.with_suffix(".jsonl")
    assert bench.main(["--smoke", "--json", str(out), "--jsonl", str(jsonl)]) == 0
    return bench, json.loads(out.read_text()), jsonl


def _dims(bench, model_kind: str) -> dict[str, tuple[int, int]]:
    common = _load("_bench_common")
    model, regex = bench.build_model(model_kind, smoke=True)
    return common.linear_dims(model, regex)


def test_overhead_parameter_counts_and_state(overhead):
    bench, res = overhead
    runs = {(r["model"], r["config"]): r for r in res["runs"]}
    assert set(runs) == {(m, c) for m in bench.DEFAULT_MODELS for c in bench.CONFIGS}
    for model_kind in bench.DEFAULT_MODELS:
        dims = _dims(bench, model_kind)
        lora8 = sum(8 * (o + i) for o, i in dims.values())
        triplet = {n: o + i + 1 for n, (o, i) in dims.items()}
        lora = runs[(model_kind, "lora")]
        assert lora["params_start"] == lora["params_end"] == lora8
        assert runs[(model_kind, "fixed")]["params_start"] == 8 * sum(triplet.values())
        ada = runs[(model_kind, "adaptive")]
        assert ada["params_start"] == 12 * sum(triplet.values())
        assert ada["params_end"] <= lora8 < ada["params_start"]
        assert ada["params_end"] == sum(r * triplet[n] for n, r in ada["ranks"].items())
        assert ada["alloc_s"] > 0 and "alloc" in ada["kind"]  # capture happens on that step
        # capture transient: the sketches Y (d_out × l1), W (l2 × d_in) and sampled inputs are
        # held (> 0) but stay below the dense Σ δxᵀ (d_out × d_in, float32) of every layer
        dense = 4 * sum(o * i for o, i in dims.values())
        assert 0 < ada["capture_bytes_peak"]
        assert ada["capture_bytes_peak"] - 4 * 64 * sum(i for _, i in dims.values()) < dense
        assert 0 < ada["state_bytes_peak"] < ada["adapter_end_bytes"]
        peft_ada = runs[(model_kind, "adalora")]
        # PEFT AdaLoRA: A (12, d_in), B (d_out, 12), E (12, 1) and three buffers of that size
        assert peft_ada["params_start"] == sum(12 * (o + i + 1) for o, i in dims.values())
        assert peft_ada["state_bytes_peak"] == 3 * 4 * peft_ada["params_start"]
        assert sum(peft_ada["ranks"].values()) == 8 * len(dims)  # its budget counts ranks
        assert runs[(model_kind, "floor")]["params_start"] == 1
        for r in runs.values():
            assert len(r["wall_s"]) == len(r["cpu_s"]) == r["steps"]
            assert all(t > 0 for t in r["wall_s"])


def test_overhead_summary_ratios(overhead):
    bench, res = overhead
    for model_kind in bench.DEFAULT_MODELS:
        ratios = res["summary"]["ratios"][model_kind]
        assert {"adaptive/lora", "adaptive/adalora", "lora/floor"} <= set(ratios)
        for values in ratios.values():
            assert all(math.isfinite(v) and v > 0 for v in values.values())
    assert "| adaptive/lora |" in res["summary"]["markdown"]


def test_overhead_memory_per_phase(overhead):
    """Per-step live-tensor bytes: the trainable part of every configuration equals params +
    grads + AdamW's two moments (4 × 4 bytes per parameter) + one 4-byte ``step`` per tensor,
    computed from the layer shapes; the phases follow the schedule's allocation steps."""
    bench, res = overhead
    runs = {(r["model"], r["config"]): r for r in res["runs"]}
    steps, interval = 12, 3  # --smoke: warm-up round(0.1·12) = 1, final round(0.2·12) = 2
    first, final = interval * math.ceil(1 / interval), steps - 2
    phases = ["warmup"] * (first - 1) + ["decay"] * (final - first + 1) + ["final"] * 2
    for model_kind in bench.DEFAULT_MODELS:
        dims = _dims(bench, model_kind)
        n_layers = len(dims)
        lora8 = sum(8 * (o + i) for o, i in dims.values())
        triplet = sum(o + i + 1 for o, i in dims.values())
        expect = {
            "fixed": 16 * 8 * triplet + 4 * 3 * n_layers,  # P, λ, Q
            "lora": 16 * lora8 + 4 * 2 * n_layers,  # lora_A, lora_B
            "floor": 16 + 4,  # the scalar gain
        }
        for cfg, trainable in expect.items():
            assert set(runs[(model_kind, cfg)]["memory"]["trainable"]) == {trainable}
        fixed, floor = runs[(model_kind, "fixed")], runs[(model_kind, "floor")]
        ada = runs[(model_kind, "adaptive")]
        # the warm-up holds the rank-12 start: 1.5× the adapter state of rank 8
        assert ada["memory"]["trainable"][0] == 16 * 12 * triplet + 4 * 3 * n_layers
        for r in runs.values():
            assert r["phase"] == phases and r["phase_bounds"] == [first, final]
        alloc = [s for s, k in enumerate(ada["kind"], 1) if k == "alloc"]
        assert alloc and all(first <= s <= final for s in alloc) and final in alloc
        for i in range(steps):  # the frozen base cancels: fixed − floor is the adapter's own
            mf = {k: v[i] for k, v in fixed["memory"].items()}
            mb = {k: v[i] for k, v in floor["memory"].items()}
            assert mf["params"] - mb["params"] == 4 * 8 * triplet - 4
            assert mf["total"] == sum(mf[k] for k in ("params", "grads", "optimizer", "saved"))
            assert mf["total"] - mb["total"] == (
                mf["trainable"] - mb["trainable"] + mf["saved"] - mb["saved"]
            )
        # capture sketches + controller state; the captured input rows (2 × 16 tokens, all
        # kept) are views of the activations the adapters save, so they are not added again
        rows = 4 * 2 * 16 * sum(i for _, i in dims.values())
        cap = max(ada["memory"]["extra"])
        assert 0 < cap <= ada["capture_bytes_peak"] - rows + ada["state_bytes_peak"]
        for r in runs.values():
            assert len(r["rss_step_peak_bytes"]) == steps and min(r["rss_step_peak_bytes"]) > 0
            assert r["rss_method"] in ("vmhwm", "vmrss-sampled")
            assert r["cuda_step_peak_bytes"] is None and r["cuda_peak_bytes"] is None
            assert sum(v["steps"] for v in r["memory_by_phase"].values()) == steps
        mem = res["summary"]["memory"][model_kind]
        warm = mem["ratios"]["adaptive/lora"]["warmup"]
        assert set(mem["ratios"]["adaptive/lora"]) == {"warmup", "decay", "final"}
        ada_adapter = mem["table"]["adaptive"]["warmup"]["adapter_median"]
        lora_adapter = mem["table"]["lora"]["warmup"]["adapter_median"]
        assert warm["adapter_median"] == pytest.approx(ada_adapter / lora_adapter)
        assert 1.2 < warm["adapter_median"] < 1.8 and 1.0 < warm["total_median"]
    assert "peak memory per step by phase" in res["summary"]["markdown"]


def test_step_memory_of_one_linear_adapter():
    """StepMemory on one SVDLoRALinear / PEFT LoRA layer over an input without grad: the saved
    activations are the input x and the rank-r intermediates, counted once each."""
    import torch
    from peft import LoraConfig, get_peft_model

    from adarank.modules import SVDLoRALinear

    mem = _load("_bench_memory")
    n, d_in, d_out, r = 40, 24, 16, 4
    x = torch.randn(n, d_in)
    for kind in ("adarank", "lora"):
        torch.manual_seed(0)
        if kind == "adarank":
            model = torch.nn.Sequential(SVDLoRALinear(torch.nn.Linear(d_in, d_out), r))
            n_adapter, n_tensors = r * (d_in + d_out + 1), 3
            # x for ∂Q, z = Qx (z·(s·λ) is recomputed in backward), and the r-vector s·λ
            saved = 4 * (n * d_in + n * r + r)
        else:
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["0"])
            model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)), cfg)
            n_adapter, n_tensors = r * (d_in + d_out), 2
            saved = 4 * (n * d_in + n * r)  # x for ∂A, A·x for ∂B
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        step = mem.StepMemory()
        with step.saving():
            loss = model(x).square().mean()
        loss.backward()
        opt.step()
        fresh = torch.zeros(5)  # a buffer of the method's own, listed twice: counted once
        assert step.hold([x.reshape(-1, d_in)[1:], fresh, fresh]) == 20  # x: saved, a view
        parts = step.measure(model, opt, extra=7)
        assert parts["trainable"] == 16 * n_adapter + 4 * n_tensors
        assert parts["params"] == 4 * (d_out * d_in + d_out + n_adapter)
        assert parts["grads"] == 4 * n_adapter
        assert parts["optimizer"] == 8 * n_adapter + 4 * n_tensors
        assert parts["saved"] == saved + 4 * n * d_out  # + the output, saved by square()
        assert parts["total"] == sum(parts[k] for k in mem.PARTS) and parts["extra"] == 27
    assert mem.phase_of(2, 3, 10) == "warmup" and mem.phase_of(3, 3, 10) == "decay"
    assert mem.phase_of(10, 3, 10) == "decay" and mem.phase_of(11, 3, 10) == "final"


def test_overhead_report_mixes_old_and_new_records(overhead, tmp_path, capsys):
    """--report over a JSON-lines log: records from before the memory fields still summarise."""
    bench, res = overhead
    common = _load("_bench_common")
    jsonl = tmp_path / "o.jsonl"
    keep = [r for r in res["runs"] if r["model"] == "bert"]
    old = {k: v for k, v in keep[0].items() if k not in ("memory", "phase", "memory_by_phase")}
    for r in [old, *keep]:
        common.append_jsonl(jsonl, r)
    assert bench.main(["--report", str(jsonl)]) == 0  # every model in the file
    text = capsys.readouterr().out
    assert "bert: peak memory per step by phase" in text
    assert text.count("| adaptive/lora | ") == 4  # the step-time row + one per phase


def test_step_metrics_amortises_allocation_extra():
    report = _load("_bench_overhead_report")
    run = {
        "wall_s": [9.0, 9.0, 1.0, 1.2, 0.8, 3.0, 5.0, 1.0],
        "kind": ["plain"] * 5 + ["capture", "alloc", "plain"],
    }
    m = report.step_metrics(run, "wall_s", interval=10)
    # the two warm-up steps are skipped; steady = median(1.0, 1.2, 0.8, 1.0) = 1.0
    assert m["steady"] == pytest.approx(1.0)
    assert m["mean"] == pytest.approx(12.0 / 6)
    # extra = (3 - 1) + (5 - 1) over one allocation; the allocation step alone is 4 above steady
    assert m["extra_per_alloc"] == pytest.approx(6.0)
    assert m["extra_max"] == pytest.approx(4.0)
    assert m["amortised"] == pytest.approx(1.0 + 4.0 / 10)


def test_quality_smoke_budgets(quality):
    bench, res, jsonl = quality
    recs = res["minilm"]
    assert {(r["method"], r["budget_r"]) for r in recs} == {
        (m, b) for m in bench.METHODS for b in (2, 4)
    }
    model = bench.build_model(bench.parse_args(["--smoke"]), seed=0)
    common = _load("_bench_common")
    dims = common.linear_dims(model, common.BERT_TARGET_REGEX)
    for r in recs:
        assert 0.0 <= r["val_acc"] <= 1.0 and math.isfinite(r["train_loss_last"])
        assert r["param_budget"] == sum(r["budget_r"] * (o + i) for o, i in dims.values())
        assert set(r["ranks"]) == set(dims)
        if r["method"] == "lora":
            assert r["physical_params_end"] == r["param_budget"]
        if r["method"] == "adarank":
            assert r["effective_params_end"] == r["physical_params_end"] <= r["param_budget"]
            # the peak covers the start and the warm-up budget's growth, never below either end
            peak = r["physical_params_peak"]
            assert peak >= max(r["physical_params_start"], r["physical_params_end"])
        if r["method"] == "adarank-fixed":  # same layer, allocation off, LoRA's rank
            assert set(r["ranks"].values()) == {r["budget_r"]}
            assert r["physical_params_end"] == r["physical_params_start"]
            assert r["adarank_config"]["adarank_scaling"] == 16.0
            # the retraction runs without allocation too: P, Q stay orthonormal (Adam alone
            # moves their columns off unit length within a few steps at this rate)
            assert r["adarank_config"]["adarank_retract"] is True
            assert r["trace"][-1]["factor_norm_max"] == pytest.approx(1.0, abs=1e-4)
        if r["method"] == "adalora":
            assert sum(r["ranks"].values()) == r["budget_r"] * len(dims)
            assert r["physical_params_end"] == r["physical_params_start"]  # masks, never resizes
    assert len(common.read_jsonl(jsonl)) == len(recs)  # resumable log written run by run


def test_quality_smoke_planted_vs_adalora(quality):
    _, res, _ = quality
    recs = res["planted"]
    methods = {r["method"] for r in recs}
    assert "adarank" in methods and any(m.startswith("peft-adalora") for m in methods)
    for r in recs:
        assert set(r["ranks"]) == {f"blocks.{i}" for i in range(4)}
        assert math.isfinite(r["rank_recovery_error"]) and r["heldout_mse"] > 0
        if r["method"].startswith("peft-adalora"):
            init_r, target_r = (int(v) for v in r["method"].split()[-1].split("→"))
            assert sum(r["ranks"].values()) == target_r * 4
            # three element-wise buffers of the rank-init_r adapter (4 modules, 16 × 16)
            assert r["allocator_state_bytes"] == 3 * 4 * 4 * init_r * (16 + 16 + 1)


def test_quality_report_resumes_from_jsonl(quality, capsys):
    bench, res, jsonl = quality
    assert bench.main(["--report", str(jsonl)]) == 0
    text = capsys.readouterr().out
    assert text.count("| adarank |") == 2 and text.count("| lora |") == 2


def test_profile_growth_step_smoke(tmp_path):
    """The growth-step profile separates plain and growth steps and restores the controller."""
    prof = _load("profile_growth_step")
    import adarank.allocation.controller as controller_mod

    before = controller_mod.candidates_from_sketch
    out = tmp_path / "p.json"
    assert prof.main(["--smoke", "--model", "bert", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert controller_mod.candidates_from_sketch is before
    calls = res["calls"]
    n_growth = calls["growth: forward"]
    assert n_growth == 4 and calls["plain: forward"] == 5  # 9 steps, growth every 2nd from 2
    assert calls["candidates"] == n_growth * res["layers"]  # every layer proposes at every growth
    assert res["median_ms"]["plain: controller.step"] < res["median_ms"]["growth: controller.step"]
    assert res["growth_extra_ms"] > 0 and res["plain_step_ms"] > 0


def test_quality_resume_key_includes_the_settings(tmp_path):
    """A JSON-lines log resumes only runs with the same settings: changing the re-allocation
    interval (or any protocol / adarank option) must run again, not reuse the old records."""
    bench = _load("bench_quality")
    common = _load("_bench_common")
    jsonl = tmp_path / "q.jsonl"
    base = ["--smoke", "--part", "minilm", "--methods", "adarank", "--jsonl", str(jsonl)]
    assert bench.main(base) == 0
    first = common.read_jsonl(jsonl)
    assert len(first) == 2  # smoke: budgets 2 and 4, one lr, one seed
    assert bench.main(base) == 0
    assert len(common.read_jsonl(jsonl)) == 2  # same settings: resumed, nothing re-run
    assert bench.main([*base, "--interval", "3"]) == 0
    recs = common.read_jsonl(jsonl)
    assert len(recs) == 4
    assert sorted(r["protocol"]["interval"] for r in recs) == [3, 3, 5, 5]
    # a record from before --adarank-new-slot-moments existed ran with zero moments: it resumes
    # only a run asking for "zero", never the new default "mean"
    legacy = tmp_path / "legacy.jsonl"
    old = [r | {"adarank_config": r["adarank_config"].copy()} for r in first]
    for r in old:
        assert r["adarank_config"].pop("adarank_new_slot_moments") == "mean"
    legacy.write_text("".join(json.dumps(r) + "\n" for r in old))
    argv = [*base[:-1], str(legacy), "--adarank-new-slot-moments", "zero"]
    assert bench.main(argv) == 0
    assert len(common.read_jsonl(legacy)) == 2  # resumed
    assert bench.main(argv[:-2]) == 0
    assert len(common.read_jsonl(legacy)) == 4  # "mean" is a different setting: ran again


def test_overhead_bf16_autocast_smoke(tmp_path):
    """--precision bf16 (the GPU section's set-up; autocast works on CPU too) runs every method
    with the same budget logic and records the precision and device."""
    bench = _load("bench_overhead")
    out = tmp_path / "o.json"
    argv = ["--smoke", "--precision", "bf16", "--models", "bert", "--configs", "adaptive,lora"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = {r["config"]: r for r in res["runs"]}
    assert {r["precision"] for r in runs.values()} == {"bf16"}
    assert {r["device"] for r in runs.values()} == {"cpu"}
    for r in runs.values():
        assert all(math.isfinite(t) and t > 0 for t in r["wall_s"])
    assert runs["adaptive"]["params_end"] <= runs["adaptive"]["lora_r8_params"]
    assert runs["adaptive"]["params_end"] < runs["adaptive"]["params_start"]  # it re-allocated
    with pytest.raises(SystemExit):  # a clear argparse error, not a crash deep in torch
        bench.main(["--smoke", "--device", "tpu"])


def test_quality_trace_matches_dense_delta_for_each_method(quality):
    """The 'trace' of a run (‖ΔW‖₂/‖W0‖₂ over layers, every --trace-every steps) equals the
    ratios computed from the dense ΔW each library builds itself (adarank ``delta_weight``,
    PEFT ``get_delta_weight``) on models of each method."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from adarank.modules import add_adapters

    bench, res, _ = quality
    assert all(r["trace"][0]["step"] == 1 for r in res["minilm"])  # recorded by default
    common = _load("_bench_common")
    args = bench.parse_args(["--smoke"])
    torch.manual_seed(0)
    adarank = bench.build_model(args, 0)
    layers = add_adapters(adarank, ["re:" + common.BERT_TARGET_REGEX], 3, scaling=4.0)
    lora = get_peft_model(
        bench.build_model(args, 0), LoraConfig(r=2, target_modules=common.BERT_TARGET_REGEX)
    )
    ada_cfg = AdaLoraConfig(
        init_r=3, target_r=2, total_step=10, target_modules=common.BERT_TARGET_REGEX
    )
    adalora = get_peft_model(bench.build_model(args, 0), ada_cfg)
    with torch.no_grad():
        for model in (adarank, lora, adalora):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * torch.randn_like(p))  # every factor nonzero and non-orthonormal

    def want(model, dense):
        ratios = sorted(
            float(torch.linalg.matrix_norm(dense(m).detach().double(), ord=2))
            / float(torch.linalg.matrix_norm(m.base_layer.weight.double(), ord=2))
            for m in model.modules()
            if hasattr(m, "base_layer") and (hasattr(m, "lora_P") or hasattr(m, "lora_A"))
        )
        return ratios[-1], ratios[len(ratios) // 2]

    cases = {
        "adarank": (adarank, lambda m: m.delta_weight()),
        "lora": (lora, lambda m: m.get_delta_weight("default")),
        "adalora": (adalora, lambda m: m.get_delta_weight("default")),
    }
    for method, (model, dense) in cases.items():
        got = bench.delta_stats(model, method)
        top, mid = want(model, dense)
        assert got["dw_rel_max"] == pytest.approx(top, abs=1e-4), method
        assert got["dw_rel_median"] == pytest.approx(mid, abs=1e-4), method

    # factor_norm_max: the longest unscaled direction — P's columns and Q's rows (LoRA: B's
    # columns, A's rows), here taken one vector at a time
    def longest(model, names):
        return max(
            float(torch.linalg.vector_norm(v.detach().double()))
            for n, p in model.named_parameters()
            if any(n.endswith(k) for k in names)
            for v in (p.T if ("lora_P" in n or "lora_B" in n) else p)
        )

    assert len(layers)
    got = bench.delta_stats(adarank, "adarank")["factor_norm_max"]
    assert got == pytest.approx(longest(adarank, ("lora_P", "lora_Q")), abs=1e-4) and got > 1.0
    got = bench.delta_stats(lora, "lora")["factor_norm_max"]
    assert got == pytest.approx(
        longest(lora, ("lora_A.default.weight", "lora_B.default.weight")), abs=1e-4
    )
    fresh = bench.build_model(args, 0)
    add_adapters(fresh, ["re:" + common.BERT_TARGET_REGEX], 3, scaling=4.0)
    assert bench.delta_stats(fresh, "adarank")["factor_norm_max"] == pytest.approx(1.0, abs=1e-4)


def test_quality_first_seed_runs_only_the_later_seeds(tmp_path, capsys):
    """--first-seed lets the seeds of one configuration run in parallel processes: only seeds
    ≥ first-seed run, with no lr tuning (so exactly one lr is required)."""
    bench = _load("bench_quality")
    common = _load("_bench_common")
    jsonl = tmp_path / "q.jsonl"
    argv = ["--smoke", "--part", "minilm", "--methods", "adarank", "--jsonl", str(jsonl)]
    assert bench.main([*argv, "--first-seed", "1"]) == 0
    recs = common.read_jsonl(jsonl)
    assert sorted((r["budget_r"], r["seed"]) for r in recs) == [(2, 1), (4, 1)]
    for bad, match in (
        (["--first-seed", "3", "--seeds", "3"], "expected 0 ≤ first-seed < --seeds 3"),
        (["--first-seed", "1", "--lrs", "1e-3,3e-3"], "give one --lrs"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert match in capsys.readouterr().err


def test_diag_growth_noise_smoke(tmp_path):
    """The growth-noise diagnostic runs end to end and reports positive, finite top singular
    values for every adapted layer of the tiny model."""
    diag_growth_noise = _load("diag_growth_noise")

    out = tmp_path / "diag.json"
    assert diag_growth_noise.main(["--smoke", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["batch_size"] == 8 and rec["steps"] == 5 and len(rec["layers"]) == 12
    for row in rec["layers"]:
        for key in ("batch", "noise", "mean"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["layer"], key)
    assert rec["noise_over_batch"]["min"] <= rec["noise_over_batch"]["median"]
    with pytest.raises(SystemExit):
        diag_growth_noise.main(["--smoke", "--batch-size", "7"])
