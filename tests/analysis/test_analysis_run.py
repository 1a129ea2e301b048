"""End to end: the analysis of a tiny finished run directory, and the CLI handler."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from adarank.analysis import analyze_run
from adarank.analysis.analyze import FIGURES
from adarank.analysis.base_weights import (
    resolve_base_weights,
    save_base_weights,
    weights_from_model,
)
from adarank.analysis.cli import add_parser, main
from adarank.analysis.run_files import AnalysisInputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_analysis(tiny_run_with_weights, other_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis_out")
    return analyze_run(tiny_run_with_weights, against=other_run, out_dir=out)


def test_every_artefact_is_written(full_analysis):
    out = full_analysis.out_dir
    assert set(full_analysis.figures) == set(FIGURES)  # all inputs present → all figures
    for key, name in FIGURES.items():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, key
    data = json.loads((out / "analysis.json").read_text())
    for key in (
        "rank_evolution",
        "spectra",
        "subspace_similarity",
        "delta_vs_w",
        "module_correlation",
        "figures",
    ):
        assert key in data
    report = (out / "report.md").read_text()
    for name in FIGURES.values():
        assert f"]({name})" in report, name
    assert not list(out.glob(".*.tmp")) and not list(
        out.glob(".*.png")
    )  # atomic writes left nothing


def test_rank_evolution_numbers(full_analysis, tiny_run_with_weights):
    evo = full_analysis.data["rank_evolution"]
    cfg = json.loads((tiny_run_with_weights / "adapter" / "adapter_config.json").read_text())
    assert evo["final_ranks"] == {n: c["rank"] for n, c in cfg["layers"].items()}
    assert evo["module_types"]["encoder.layer.0.attention.output.dense"] == "attention-output"
    assert evo["by_type"]["query"]["modules"] == 2
    assert set(evo["by_depth"]) == {"0", "1"}
    assert evo["steps"] == list(range(1, 25))
    # the first "death" (layer index 0 of 12) is visible in the heatmap table at step 8
    row = evo["layers"].index("encoder.layer.0.attention.self.query")
    assert evo["ranks"][row][6] == 4 and evo["ranks"][row][7] == 3
    assert evo["births_total"] == sum(evo["budget"]["grown"]) > 0
    assert evo["deaths_total"] == sum(evo["budget"]["pruned"]) > 0


def test_spectra_match_dense_delta_weight(full_analysis, tiny_run_with_weights):
    from safetensors.numpy import load_file

    t = load_file(str(tiny_run_with_weights / "adapter" / "adapter.safetensors"))
    name = "encoder.layer.1.output.dense"
    dense = (
        t[f"{name}.lora_P"].astype(float) @ np.diag(t[f"{name}.lora_lambda"]) @ t[f"{name}.lora_Q"]
    )
    s_ref = np.linalg.svd(dense, compute_uv=False)
    sp = full_analysis.data["spectra"][name]
    np.testing.assert_allclose(sp["singular_values"], s_ref[: sp["numerical_rank"]], rtol=1e-4)
    assert sp["normalized"][0] == 1.0


def test_similarity_sections(full_analysis):
    sim = full_analysis.data["subspace_similarity"]
    snap = sim["snapshots"]
    assert snap["steps"] == [8, 16]
    grid = snap["grids"]["encoder.layer.0.attention.self.key"]
    assert len(grid["grid"]) == grid["i_max"] and len(grid["grid"][0]) == grid["j_max"]
    against = sim["against"]["grids"]["encoder.layer.0.intermediate.dense"]
    assert against["random_baseline"] == pytest.approx(
        max(against["i_max"], against["j_max"]) / 16, abs=1e-6
    )
    corr = full_analysis.data["module_correlation"]
    n = len(corr["layers"])
    k = corr["layers"].index("encoder.layer.1.output.dense")  # the only d_in = 32 modules
    q = corr["layers"].index("encoder.layer.0.attention.self.query")
    assert corr["matrix"][q][q] == pytest.approx(1.0)
    assert corr["matrix"][k][q] is None and len(corr["matrix"]) == n


def test_delta_vs_w_uses_the_pretrained_weights(full_analysis):
    dvw = full_analysis.data["delta_vs_w"]
    assert dvw["available"] and dvw["source"] == "base_weights.safetensors"
    m = dvw["modules"]["encoder.layer.0.attention.self.value"]
    assert m["amplification"] == pytest.approx(m["delta_norm"] / m["proj_delta_dirs"], rel=1e-4)
    assert m["proj_w_dirs"] >= m["proj_delta_dirs"] - 1e-9  # W's own top-r directions maximise it


def test_base_weight_sources_agree(tiny_run, tmp_path):
    run_dir, model = tiny_run
    names = ["encoder.layer.1.attention.self.query", "encoder.layer.0.output.dense"]
    from_model, src = resolve_base_weights(run_dir, names, model=model)
    assert src == "given model"
    save_base_weights(model, tmp_path / "w.safetensors")
    from_file, _ = resolve_base_weights(
        run_dir, names, base_weights_path=tmp_path / "w.safetensors"
    )
    given, _ = resolve_base_weights(run_dir, names, base_weights=from_model)
    for n in names:
        w = model.get_submodule(n).base_layer.weight.detach().double().numpy()
        np.testing.assert_allclose(from_model[n], w)
        np.testing.assert_allclose(from_file[n], w, rtol=1e-6)
        np.testing.assert_allclose(given[n], w)
    with pytest.raises(AnalysisInputError, match="lacks adapter layers"):
        resolve_base_weights(run_dir, names, base_weights={names[0]: from_model[names[0]]})


def test_base_weights_add_back_a_shifted_base(tiny_bert_cls):
    from adarank.modules import add_adapters

    model = tiny_bert_cls(layers=1)
    w0 = model.encoder.layer[0].attention.self.query.weight.detach().double().clone()
    add_adapters(model, ["re:.*query$"], init_rank=2, seed=0)
    layer = model.encoder.layer[0].attention.self.query
    layer.shift_base(torch.randn(16, 2), torch.randn(2, 16))
    layer.merge()
    got = weights_from_model(model, ["encoder.layer.0.attention.self.query"])
    np.testing.assert_allclose(got["encoder.layer.0.attention.self.query"], w0.numpy(), atol=1e-5)


def _fake_runs(monkeypatch, load_run):
    module = types.ModuleType("adarank.runs")
    module.load_run = load_run
    monkeypatch.setitem(sys.modules, "adarank.runs", module)


def test_load_run_is_the_fallback_source(tiny_run, monkeypatch):
    run_dir, model = tiny_run
    _fake_runs(monkeypatch, lambda d: types.SimpleNamespace(model=model, config={}))
    weights, src = resolve_base_weights(run_dir, ["encoder.layer.0.intermediate.dense"])
    assert src == "load_run(config.yaml)" and weights[
        "encoder.layer.0.intermediate.dense"
    ].shape == (32, 16)


def test_cli_without_base_weights_skips_that_section(tiny_run, tmp_path, monkeypatch, capsys):
    def broken(run_dir):
        raise KeyError("model")

    run_dir, _ = tiny_run
    _fake_runs(monkeypatch, broken)
    parser = argparse.ArgumentParser(prog="adarank")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(run_dir), "--out", str(tmp_path)])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert "report.md" in captured.out
    assert "ΔW vs W skipped" in captured.err and "could not rebuild" in captured.err
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert not data["delta_vs_w"]["available"] and "KeyError" in data["delta_vs_w"]["reason"]
    assert "delta_vs_w" not in data["figures"] and not (tmp_path / FIGURES["delta_vs_w"]).exists()
    assert "Skipped:" in (tmp_path / "report.md").read_text()
    assert (tmp_path / FIGURES["spectra"]).is_file()


def test_against_with_different_layers_is_rejected(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    cfg_path = other / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers"].pop("encoder.layer.1.output.dense")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AnalysisInputError, match="only in .*encoder.layer.1.output.dense"):
        analyze_run(run_dir, against=other, out_dir=tmp_path / "out")


# ------------------------------------------------------------------ CLI
def _broken(tiny_run, tmp_path, what: str):
    run_dir, _ = tiny_run
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    if what == "no adapter":
        shutil.rmtree(bad / "adapter")
    elif what == "empty ranks":
        (bad / "ranks.csv").write_text("step,layer,rank\n")
    return bad


@pytest.mark.parametrize(
    "what,message",
    [("no adapter", "has no adapter/"), ("empty ranks", "no rows"), ("missing", "does not exist")],
)
def test_cli_exit_code_2_on_bad_input(tiny_run, tmp_path, capsys, what, message):
    bad = tmp_path / "nowhere" if what == "missing" else _broken(tiny_run, tmp_path, what)
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "adarank analyze: error:" in err and message in err


def test_cli_against_mismatch_exit_2(tiny_run, tmp_path, capsys, tiny_bert_cls):
    from adarank.modules import add_adapters, save_adapter

    run_dir, _ = tiny_run
    other = tiny_bert_cls()
    add_adapters(other, ["re:.*query$"], init_rank=2, seed=0)  # a run that adapted only W_q
    save_adapter(other, tmp_path / "other" / "adapter")
    assert (
        main([str(run_dir), "--against", str(tmp_path / "other"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "adapts different layers" in err and "encoder.layer.0.attention.self.key" in err


def test_wandb_offline_logging(full_analysis, tmp_path, monkeypatch):
    from adarank.analysis.wandb_log import flat_scalars, log_analysis

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_analysis(full_analysis.data, full_analysis.figures, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    scalars = flat_scalars(full_analysis.data)
    assert (
        scalars["rank/encoder.layer.0.attention.self.key"]
        == full_analysis.data["rank_evolution"]["final_ranks"]["encoder.layer.0.attention.self.key"]
    )
    assert any(k.startswith("delta_vs_w/amplification/") for k in scalars)


def test_adarank_cli_dispatches_analyze(tiny_run, tmp_path, capsys):
    from adarank.cli import main as adarank_main

    run_dir, _ = tiny_run
    assert adarank_main(["analyze", str(tmp_path / "missing")]) == 2
    assert "adarank analyze: error:" in capsys.readouterr().err
