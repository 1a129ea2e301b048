"""Merged export: plain transformers directories with the same outputs as the adapted model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from adarank.export import export_merged, merge_and_unwrap
from adarank.modules import SVDLoRALinear, adapter_layers, add_adapters


def test_merged_bert_reloads_with_plain_transformers(make_adapted, token_batch, logits, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = make_adapted("bert")
    ids = token_batch(batch=3, seq=10)
    ref = logits(model, ids)
    export_merged(model, tmp_path / "merged")
    # the source model is untouched (a copy was merged)
    assert adapter_layers(model) and not any(m.merged for m in adapter_layers(model).values())
    torch.testing.assert_close(logits(model, ids), ref, atol=0, rtol=0)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, SVDLoRALinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=1e-5)
    # the export really contains the update: the base alone gives other logits
    assert not torch.allclose(logits(type(plain)(plain.config).eval(), ids), ref, atol=1e-3)


def test_merged_gpt2_conv1d_matches(make_adapted, token_batch, logits, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_adapted("gpt2")
    ids = token_batch(batch=2, seq=12)
    export_merged(model, tmp_path / "gpt2")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_merged_gpt2_loads_in_a_process_without_adarank(
    make_adapted, token_batch, logits, tmp_path
):
    model = make_adapted("gpt2")
    ids = token_batch(batch=2, seq=12)
    ref = logits(model, ids)
    out = export_merged(model, tmp_path / "gpt2")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            y = m(input_ids=ids).logits
        print(json.dumps({{"adarank": "adarank" in sys.modules, "logits": y.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["adarank"] is False
    torch.testing.assert_close(torch.tensor(result["logits"]), ref, atol=1e-5, rtol=1e-5)


def test_merge_keeps_dtype_and_merges_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    add_adapters(model, ["0", "2"], 3, seed=0)
    layer = adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1e-3, 2e-3, 3e-3]))
    expected = (layer.base_layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    plain = merge_and_unwrap(model)
    assert isinstance(plain[0], nn.Linear) and plain[0].weight.dtype == torch.bfloat16
    assert torch.equal(plain[0].weight, expected)


def test_merge_refuses_non_finite_weights_and_models_without_adapters(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no adarank adapter layers"):
        merge_and_unwrap(model)
    add_adapters(model, ["0"], 2)
    with torch.no_grad():
        adapter_layers(model)["0"].lora_lambda.fill_(float("nan"))
    with pytest.raises(ValueError, match="merged weight of layer '0' is not finite"):
        merge_and_unwrap(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        export_merged(model, tmp_path / "x")


def test_merged_export_refuses_non_empty_destination(make_adapted, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(make_adapted("bert"), out)
    assert (out / "keep.txt").read_text() == "x"
    export_merged(make_adapted("bert"), out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
