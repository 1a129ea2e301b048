"""Native export: adapter files written atomically and copied with validation."""

from __future__ import annotations

import pytest
import torch

from adarank.export import copy_adapter, export_adapter
from adarank.modules import load_adapter


def test_export_adapter_round_trips(make_adapted, make_base, token_batch, logits, tmp_path):
    model = make_adapted("bert")
    export_adapter(model, tmp_path / "a", metadata={"note": "x"})
    copy_adapter(tmp_path / "a", tmp_path / "b")
    fresh = make_base("bert")
    config = load_adapter(fresh, tmp_path / "b")
    assert config["metadata"] == {"note": "x"}
    ids = token_batch()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_copy_adapter_refuses_foreign_or_incomplete_directories(make_adapted, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="not an adarank adapter config"):
        copy_adapter(tmp_path / "foreign", tmp_path / "out")
    export_adapter(make_adapted("bert"), tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        copy_adapter(tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
