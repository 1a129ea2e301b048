"""Module type/depth inference and the run-file readers' error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adarank.analysis.naming import module_depth, module_type
from adarank.analysis.run_files import (
    AnalysisInputError,
    list_snapshots,
    read_adapter,
    read_budget_csv,
    read_ranks_csv,
)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("bert.encoder.layer.3.attention.self.query", "query"),
        ("bert.encoder.layer.3.attention.self.key", "key"),
        ("bert.encoder.layer.3.attention.self.value", "value"),
        ("bert.encoder.layer.3.attention.output.dense", "attention-output"),
        ("bert.encoder.layer.3.intermediate.dense", "intermediate"),
        ("bert.encoder.layer.3.output.dense", "output"),
        ("transformer.h.0.attn.c_attn", "qkv"),
        ("transformer.h.0.attn.c_proj", "attention-output"),
        ("transformer.h.0.mlp.c_fc", "intermediate"),
        ("transformer.h.0.mlp.c_proj", "output"),
        ("model.layers.2.self_attn.o_proj", "attention-output"),
        ("model.layers.2.mlp.gate_proj", "intermediate"),
        ("model.layers.2.mlp.down_proj", "output"),
        ("modules.7", "modules"),  # generic fallback: last non-numeric component
        ("bert.pooler.dense", "pooler"),
    ],
)
def test_module_type(name, expected):
    assert module_type(name) == expected


def test_module_depth():
    assert module_depth("bert.encoder.layer.11.output.dense") == 11
    assert module_depth("transformer.h.0.attn.c_attn") == 0
    assert module_depth("classifier") is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ranks_csv_carries_ranks_forward(tmp_path):
    p = _write(tmp_path / "ranks.csv", "step,layer,rank\n1,a,4\n1,b,2\n5,a,3\n9,b,6\n")
    h = read_ranks_csv(p)
    assert h.steps.tolist() == [1, 5, 9] and h.layers == ["a", "b"]
    np.testing.assert_array_equal(h.ranks, [[4, 3, 3], [2, 2, 6]])


@pytest.mark.parametrize(
    "text,match",
    [
        ("step,layer,rank\n", "no rows"),
        ("", "columns"),
        ("step,module,rank\n1,a,2\n", "missing \\['layer'\\]"),
        ("step,layer,rank\n1,a,four\n", "row 2: column 'rank' is 'four'"),
    ],
)
def test_ranks_csv_errors_name_the_problem(tmp_path, text, match):
    with pytest.raises(AnalysisInputError, match=match):
        read_ranks_csv(_write(tmp_path / "ranks.csv", text))


def test_missing_files_are_input_errors(tmp_path):
    with pytest.raises(AnalysisInputError, match="ranks.csv is missing"):
        read_ranks_csv(tmp_path / "ranks.csv")
    with pytest.raises(AnalysisInputError, match="does not exist"):
        read_adapter(tmp_path / "adapter")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(AnalysisInputError, match="adapter_config.json"):
        read_adapter(tmp_path / "adapter")


def test_budget_csv_may_be_empty_and_is_sorted(tmp_path):
    b = read_budget_csv(_write(tmp_path / "b.csv", "step,target_params,live_params,pruned,grown\n"))
    assert b.steps.size == 0
    b = read_budget_csv(
        _write(
            tmp_path / "b.csv",
            "step,target_params,live_params,pruned,grown\n20,5,6,1,0\n10,7,7,0,2\n",
        )
    )
    assert b.steps.tolist() == [10, 20] and b.grown.tolist() == [2, 0]


def test_snapshots_sorted_by_step_and_foreign_dirs_ignored(tmp_path):
    for name in ("step_0000100", "step_0000020", "notes", "step_x"):
        (tmp_path / "snapshots" / name).mkdir(parents=True)
    assert [s for s, _ in list_snapshots(tmp_path)] == [20, 100]
    assert list_snapshots(tmp_path / "nowhere") == []


def test_read_adapter_matches_the_saved_model(tiny_run):
    run_dir, model = tiny_run
    adapter = read_adapter(run_dir / "adapter")
    layer = model.encoder.layer[1].intermediate.dense
    got = adapter.layers["encoder.layer.1.intermediate.dense"]
    np.testing.assert_allclose(got["P"], layer.lora_P.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["lambda"], layer.lora_lambda.detach().numpy(), rtol=1e-6)
    assert got["rank"] == layer.rank and got["d_out"] == 32 and got["d_in"] == 16


def test_truncated_adapter_weights_are_an_input_error(tiny_run, tmp_path):
    import shutil

    run_dir, _ = tiny_run
    bad = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", bad)
    data = (bad / "adapter.safetensors").read_bytes()
    (bad / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AnalysisInputError, match="truncated or corrupt"):
        read_adapter(bad)


def test_snapshot_identical_to_final_has_phi_one(tiny_run):
    from adarank.analysis.sections import adapter_svds, snapshot_section

    run_dir, _ = tiny_run
    svds = adapter_svds(read_adapter(run_dir / "adapter"))
    early = adapter_svds(read_adapter(run_dir / "snapshots" / "step_0000008"))
    snap = snapshot_section([(8, early), (24, svds)], svds)
    assert snap["steps"] == [8, 24]
    for name, phis in snap["vs_final"].items():
        assert phis[1] == pytest.approx(1.0), name
        assert phis[0] < 1.0 - 1e-3, name  # training moved the subspaces after step 8
    grid = snap["grids"]["encoder.layer.0.attention.self.value"]["grid"]
    assert np.asarray(grid).shape == (svds["encoder.layer.0.attention.self.value"].rank,) * 2


def test_non_finite_adapter_is_an_input_error(tiny_run, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    run_dir, _ = tiny_run
    bad = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", bad)
    tensors = load_file(str(bad / "adapter.safetensors"))
    tensors["encoder.layer.0.attention.self.key.lora_lambda"][0] = np.nan
    save_file(tensors, str(bad / "adapter.safetensors"))
    with pytest.raises(AnalysisInputError, match="self.key.lora_lambda contains NaN"):
        read_adapter(bad)
