"""PEFT LoRA export (loaded by the real ``peft``) and import into SVD form."""

from __future__ import annotations

import json

import pytest
import torch

from adarank.export import export_peft, import_peft_adapter
from adarank.modules import SVDLoRALinear, adapter_layers, load_adapter, save_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_peft_export_loads_in_peft_with_same_logits(
    kind, make_adapted, make_base, special_layers, token_batch, logits, tmp_path
):
    zero, shift = special_layers[kind]
    model = make_adapted(kind)
    ids = token_batch(batch=3, seq=10)
    ref = logits(model, ids)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert zero not in config["target_modules"]  # rank-0 layer left out
    layers = adapter_layers(model)
    expected = {n: lay.rank + lay.shift_P.shape[1] for n, lay in layers.items() if n != zero}
    ranks = {n: config["rank_pattern"].get(n, config["r"]) for n in config["target_modules"]}
    assert ranks == expected and ranks[shift] == layers[shift].rank + 2
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    loaded = peft.PeftModel.from_pretrained(make_base(kind), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, ids), ref, atol=1e-5, rtol=1e-5)


def test_peft_export_carries_the_classifier_head(
    make_adapted, make_base, token_batch, logits, tmp_path
):
    model = make_adapted("bert")
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(make_base("bert"), tmp_path / "peft").eval()
    head = loaded.base_model.model.classifier  # PEFT's ModulesToSaveWrapper
    assert torch.equal(head.modules_to_save["default"].weight, model.classifier.weight)
    # the head matters: without it (base head + adapters) the logits differ
    ids = token_batch()
    with torch.no_grad():
        head.modules_to_save["default"].weight.copy_(head.original_module.weight)
    assert not torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-3)


def _peft_lora(make_base, kind: str, tmp_path, **config):
    base = make_base(kind)
    torch.manual_seed(5)
    targets = ["query", "value"] if kind == "bert" else ["c_attn"]
    lora = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, **config
    )
    pm = peft.get_peft_model(base, lora).eval()
    pm.save_pretrained(tmp_path / "src")
    return pm


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        (
            "bert",
            dict(
                modules_to_save=["classifier"],
                rank_pattern={"bert.encoder.layer.0.attention.self.query": 2},
                alpha_pattern={"bert.encoder.layer.1.attention.self.value": 3},
            ),
        ),
        ("bert", dict(use_rslora=True)),
        ("gpt2", dict(fan_in_fan_out=True)),
    ],
)
def test_peft_import_gives_same_outputs(kind, config, make_base, token_batch, logits, tmp_path):
    pm = _peft_lora(make_base, kind, tmp_path, **config)
    if "modules_to_save" in config:  # a trained head, different from the base's
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
        pm.save_pretrained(tmp_path / "src")
    ids = token_batch(batch=3, seq=9)
    ref = logits(pm, ids)
    model = make_base(kind)
    layers = import_peft_adapter(model, tmp_path / "src", scaling=2.0)
    assert all(isinstance(m, SVDLoRALinear) for m in layers.values())
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    for name, layer in layers.items():  # ready for adaptive training: orthonormal, sorted
        expected_rank = (
            2 if name.endswith("layer.0.attention.self.query") and config.get("rank_pattern") else 4
        )
        assert layer.rank == expected_rank and layer.scaling == 2.0
        torch.testing.assert_close(
            layer.lora_P.T @ layer.lora_P, torch.eye(layer.rank), atol=1e-5, rtol=0
        )
        lam = layer.lora_lambda.detach()
        assert torch.all(lam[:-1] >= lam[1:])
    # the imported model saves and reloads as a native adapter (head included)
    save_adapter(model, tmp_path / "native")
    fresh = make_base(kind)
    load_adapter(fresh, tmp_path / "native")
    torch.testing.assert_close(logits(fresh, ids), ref, atol=1e-5, rtol=1e-5)


def test_export_then_import_round_trip(make_adapted, make_base, token_batch, logits, tmp_path):
    model = make_adapted("bert")
    ids = token_batch()
    export_peft(model, tmp_path / "peft")
    fresh = make_base("bert")
    import_peft_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_import_rejects_other_methods_and_other_bases(make_base, make_tiny_bert, tmp_path):
    ia3 = peft.get_peft_model(
        make_base("bert"), peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="peft_type is 'IA3'.*only plain LoRA"):
        import_peft_adapter(make_base("bert"), tmp_path / "ia3")
    _peft_lora(make_base, "bert", tmp_path)
    wider = make_tiny_bert(0, hidden_size=48, num_labels=3)
    with pytest.raises(ValueError, match="shape mismatch for 'bert.encoder.layer.0.attention.self"):
        import_peft_adapter(wider, tmp_path / "src")
    assert not adapter_layers(wider)  # nothing was changed
    with pytest.raises(ValueError, match="has no module 'bert.encoder"):
        import_peft_adapter(make_base("gpt2"), tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        import_peft_adapter(make_base("bert"), tmp_path / "nothing")


def test_export_refuses_all_zero_rank(make_adapted, tmp_path):
    model = make_adapted("bert", zero=False, shift=False)
    for layer in adapter_layers(model).values():
        layer.prune(range(layer.rank))
    with pytest.raises(ValueError, match="have rank 0"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
