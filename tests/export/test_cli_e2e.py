"""End to end: ``adarank fit`` a tiny causal-LM run, then ``adarank export`` it in every format."""

from __future__ import annotations

import copy

import pytest
import torch

from adarank.modules import adapter_layers


@pytest.mark.slow
def test_fit_then_export_every_format(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from adarank.cli import main
    from adarank.runs import load_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    overrides = ["trainer.max_steps=4", "trainer.val_check_interval=4", "data.max_train_blocks=64"]
    assert main(["fit", "causal_lm", *overrides, "data.val_size=32", f"run.dir={run}"]) == 0
    for fmt in ("merged", "peft", "adapter"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 2

    adapted = load_run(run).model
    base = copy.deepcopy(adapted)  # the original base: undo any init shift, drop the adapters
    for name, layer in adapter_layers(base).items():
        if layer.shift_P.shape[1]:
            layer._add_to_base(layer.shift_weight(), +1.0)
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    ids = torch.randint(
        0, adapted.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(via_peft(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
