"""Adapter files: exact round trips, live-rank-sized contents, clear errors, atomic writes."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file

from adarank.modules import (
    adapter_io,
    adapter_layers,
    add_adapters,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    save_adapter,
)

TARGETS = ["query", "value", "intermediate.dense"]
Q0 = "bert.encoder.layer.0.attention.self.query"
V1 = "bert.encoder.layer.1.attention.self.value"
FC0 = "bert.encoder.layer.0.intermediate.dense"


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Adapters at mixed live ranks (one grown past init, one at 0) with nonzero λ, a head."""
    add_adapters(model, TARGETS, 3, max_rank=6, modules_to_save="classifier", seed=0)
    layers = adapter_layers(model)
    layers[Q0].grow(torch.randn(32, 2), torch.randn(2, 32))  # rank 5 > init
    layers[V1].prune(range(3))  # rank 0
    layers[FC0].prune([0])  # rank 2
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g))
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g))
    return model


def data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length + header)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def test_roundtrip_into_fresh_base_is_exact(make_tiny_bert, token_batch, tmp_path, seed):
    src = trained_like(make_tiny_bert())
    ids = token_batch()
    expected = logits(src, ids)
    save_adapter(src, tmp_path, metadata={"run": "unit"})
    dst = make_tiny_bert()  # same seed: the same base weights
    assert not torch.equal(logits(dst, ids), expected)
    config = load_adapter(dst, tmp_path)
    assert config["metadata"] == {"run": "unit"}
    torch.testing.assert_close(logits(dst, ids), expected, rtol=0, atol=0)
    src_layers, dst_layers = adapter_layers(src), adapter_layers(dst)
    assert list(dst_layers) == list(src_layers)
    for name, layer in dst_layers.items():
        assert (layer.rank, layer.max_rank, layer.scaling) == (
            src_layers[name].rank,
            src_layers[name].max_rank,
            src_layers[name].scaling,
        )
    assert dst_layers[Q0].rank == 5 and dst_layers[V1].rank == 0
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in src.named_parameters() if p.requires_grad}


def test_roundtrip_into_model_with_adapters_resizes_them(
    make_tiny_bert, token_batch, tmp_path, seed
):
    src = trained_like(make_tiny_bert())
    ids = token_batch()
    expected = logits(src, ids)
    save_adapter(src, tmp_path)
    dst = make_tiny_bert()
    add_adapters(dst, TARGETS, 4, seed=1, scaling=3.0)  # other ranks, directions, scaling
    load_adapter(dst, tmp_path)
    torch.testing.assert_close(logits(dst, ids), expected, rtol=0, atol=0)
    assert {n: m.rank for n, m in adapter_layers(dst).items()} == {
        n: m.rank for n, m in adapter_layers(src).items()
    }
    assert dst.classifier.weight.requires_grad


def test_file_holds_only_live_triplets(make_tiny_bert, tmp_path):
    model = make_tiny_bert()
    layers = add_adapters(model, TARGETS, 4)
    save_adapter(model, tmp_path / "full")
    for layer in layers.values():
        layer.prune([0, 1, 2])
    layers[V1].prune([0])
    save_adapter(model, tmp_path / "pruned")
    tensors = load_file(tmp_path / "pruned" / "adapter.safetensors")
    for name, layer in layers.items():
        r = layer.rank
        assert tensors[f"{name}.lora_P"].shape == (layer.d_out, r)
        assert tensors[f"{name}.lora_lambda"].shape == (r,)
        assert tensors[f"{name}.lora_Q"].shape == (r, layer.d_in)
    live = sum(layer.live_params for layer in layers.values())
    attn, ffn = 32 + 32 + 1, 32 + 64 + 1  # triplet costs (hidden 32, intermediate 64)
    assert live == 3 * attn + 2 * ffn  # ranks 1, 1, 1, 0 (query/value) and 1, 1 (ffn)
    assert data_bytes(tmp_path / "pruned" / "adapter.safetensors") == 4 * live  # float32
    assert data_bytes(tmp_path / "full" / "adapter.safetensors") == 4 * 4 * (4 * attn + 2 * ffn)
    assert read_adapter_config(tmp_path / "pruned")["adapter_params"] == live


def test_shift_base_roundtrips_into_original_base(make_tiny_bert, token_batch, tmp_path, seed):
    src = make_tiny_bert()
    layers = add_adapters(src, ["value", "intermediate.dense"], 2)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    shifts = {}
    for name, layer in layers.items():  # PiSSA-like: move the top-2 SVD part of W0 out
        U, S, Vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        layer.shift_base(U[:, :2] * S[:2], Vh[:2])
        shifts[name] = (U[:, :2] * S[:2]).double() @ Vh[:2].double()
        with torch.no_grad():
            layer.lora_P.copy_(U[:, :2])
            layer.lora_Q.copy_(Vh[:2])
            layer.lora_lambda.copy_(S[:2] + 0.5)  # the original part plus a trained change
    ids = token_batch()
    expected = logits(src, ids)
    save_adapter(src, tmp_path)
    dst = make_tiny_bert()
    load_adapter(dst, tmp_path)
    torch.testing.assert_close(logits(dst, ids), expected, atol=1e-5, rtol=1e-5)
    for name, layer in adapter_layers(dst).items():
        assert layer.shift_P.shape == (layer.d_out, 2)
        torch.testing.assert_close(
            layer.base_layer.weight.double(),
            originals[name].double() - shifts[name],
            atol=1e-6,
            rtol=0,
        )
    load_adapter(src, tmp_path)  # reloading into the shifted model keeps a single shift
    torch.testing.assert_close(logits(src, ids), expected, atol=1e-5, rtol=1e-5)
    for layer in adapter_layers(src).values():
        assert layer.shift_P.shape == (layer.d_out, 2)


def test_adapter_dtype_survives_a_fresh_load(make_tiny_bert, tmp_path):
    src = make_tiny_bert()
    add_adapters(src, "query", 2, adapter_dtype=torch.bfloat16)
    save_adapter(src, tmp_path)
    dst = make_tiny_bert()
    load_adapter(dst, tmp_path)
    for layer in adapter_layers(dst).values():
        assert {p.dtype for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)} == {
            torch.bfloat16
        }


def test_different_base_names_layer_and_both_shapes(make_tiny_bert, tmp_path):
    save_adapter(trained_like(make_tiny_bert()), tmp_path)
    other = make_tiny_bert(hidden_size=48)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0.*\(48, 48\).*\(32, 32\)"):
        load_adapter(other, tmp_path)
    assert not adapter_layers(other)  # a failed load leaves the model untouched
    add_adapters(other, TARGETS, 2)
    with pytest.raises(ValueError, match=r"shape mismatch for layer"):
        load_adapter(other, tmp_path)
    assert all(m.rank == 2 for m in adapter_layers(other).values())


def test_missing_truncated_and_foreign_files(make_tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_tiny_bert(), tmp_path / "nowhere")
    save_adapter(trained_like(make_tiny_bert()), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_adapter_config(tmp_path)
    config_path.write_text(json.dumps({**config, "format": "peft"}))
    with pytest.raises(ValueError, match="not an adarank adapter"):
        read_adapter_config(tmp_path)
    config_path.write_text(config_path.read_text()[:20])
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter_config(tmp_path)


def test_inconsistent_tensor_shapes_and_layer_sets(make_tiny_bert, tmp_path):
    save_adapter(trained_like(make_tiny_bert()), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layers"][Q0]["rank"] = 4  # the file holds rank 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lora_P .* shape \(32, 5\), expected \(32, 4\)"):
        load_adapter(make_tiny_bert(), tmp_path)
    save_adapter(trained_like(make_tiny_bert()), tmp_path)
    model = make_tiny_bert()
    add_adapters(model, "key", 1)
    with pytest.raises(ValueError, match="adapter layers differ"):
        load_adapter(model, tmp_path)


def test_merged_models_refuse_to_save_or_load(make_tiny_bert, tmp_path):
    model = trained_like(make_tiny_bert())
    save_adapter(model, tmp_path)
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(model, tmp_path / "merged")
    with pytest.raises(RuntimeError, match="unmerge"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(make_tiny_bert(), tmp_path / "none")


def test_writes_are_atomic(make_tiny_bert, tmp_path, monkeypatch):
    model = trained_like(make_tiny_bert())
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    before = (tmp_path / "adapter.safetensors").read_bytes()

    def crash(tensors, filename):  # dies half-way through writing
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_adapter(model, tmp_path / "bad", metadata={"x": object()})
    assert not any((tmp_path / "bad").iterdir())


def test_non_strict_load_verifies_only_the_layers_it_loads(make_tiny_bert, tmp_path):
    save_adapter(trained_like(make_tiny_bert()), tmp_path)
    model = make_tiny_bert()
    add_adapters(model, "query", 1)  # a subset of the file's layers
    with torch.no_grad():  # other base weights in a layer that is not loaded
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified, not skipped with a warning
        config = load_adapter(model, tmp_path, strict=False)
    assert {n: la.rank for n, la in adapter_layers(model).items()} == {
        n: c["rank"] for n, c in config["layers"].items() if n.endswith("query")
    }
    with torch.no_grad():  # the same change in a loaded layer is refused
        model.get_submodule(Q0).base_layer.weight.mul_(2.0)
    with pytest.raises(ValueError, match=rf"other base weights: 1 of 2 .*'{Q0}'"):
        load_adapter(model, tmp_path, strict=False)
