"""The base-weight fingerprint of adapter files: other weights of the same shapes are refused,
the run's own base passes after shifts, merges and dtype casts, and the values do not depend on
the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from adarank.modules import adapter_layers, add_adapters, load_adapter, save_adapter
from adarank.modules.base_fingerprint import base_fingerprint, check_base_fingerprint

BERT_TARGETS = ["query", "value", "intermediate.dense"]
GPT2_TARGETS = ["c_attn", "c_fc"]
Q0 = "bert.encoder.layer.0.attention.self.query"


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(model: nn.Module, targets: list[str], *, shift: bool) -> nn.Module:
    """Adapters with random λ; with ``shift``, every layer's base moved like a data-aware init:
    the top-2 SVD part of W0 (PiSSA) on even layers, a random rank-2 matrix larger than W0 on
    odd ones."""
    layers = add_adapters(model, targets, 3, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g))
            if not shift:
                continue
            w = layer.base_layer.weight.detach().float()
            w = w.T if layer.transposed else w
            if i % 2 == 0:
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                layer.shift_base(U[:, :2] * S[:2], Vh[:2])
            else:
                P0 = torch.randn(layer.d_out, 2, generator=g)
                layer.shift_base(P0, torch.randn(2, layer.d_in, generator=g))
    return model


@pytest.fixture(params=["bert", "gpt2"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def build(kind, make_tiny_bert, make_tiny_gpt2):
    """``build(seed=0, dtype=float32) -> (base model, targets)``."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float32):
        model = make_tiny_bert(seed) if kind == "bert" else make_tiny_gpt2(seed)
        return model.to(dtype), BERT_TARGETS if kind == "bert" else GPT2_TARGETS

    return make


def test_other_base_weights_of_the_same_shapes_are_refused(build, token_batch, tmp_path):
    model, targets = build(0)
    save_adapter(adapted(model, targets, shift=False), tmp_path)
    other, _ = build(1)  # same architecture and shapes, other weights
    with pytest.raises(ValueError, match=r"other base weights.*check_base=False") as err:
        load_adapter(other, tmp_path)
    assert f"{len(adapter_layers(model))} of {len(adapter_layers(model))}" in str(err.value)
    assert not adapter_layers(other)  # nothing was changed
    add_adapters(other, targets, 1)
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(other, tmp_path)
    assert all(layer.rank == 1 for layer in adapter_layers(other).values())
    load_adapter(other, tmp_path, check_base=False)  # the caller's explicit choice
    assert {n: la.rank for n, la in adapter_layers(other).items()} == {
        n: la.rank for n, la in adapter_layers(model).items()
    }


def test_one_changed_layer_is_named(make_tiny_bert, tmp_path):
    save_adapter(adapted(make_tiny_bert(0), BERT_TARGETS, shift=False), tmp_path)
    other = make_tiny_bert(0)
    weight = other.get_submodule(Q0).weight
    with torch.no_grad():  # a fine-tuned-like change of 1e-3 of the norm in one layer
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
        weight.add_(1e-3 * weight.norm() / noise.norm() * noise)
    with pytest.raises(ValueError, match=rf"1 of 6 adapted layer.*'{Q0}'"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_base_passes_after_shift_merge_and_cast(build, token_batch, tmp_path, dtype):
    model, targets = build(0, dtype)
    ids = token_batch()
    src = adapted(model, targets, shift=True)
    expected = logits(src, ids)
    config = json.loads(
        (save_adapter(src, tmp_path) / "adapter_config.json").read_text()
    )  # recorded from the shifted model
    record, names = config["base_fingerprint"], list(config["layers"])
    original, _ = build(0, dtype)
    load_adapter(original, tmp_path)  # a fresh copy of the original base
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits(original, ids), expected, atol=tol, rtol=tol)
    for layer in adapter_layers(src).values():
        layer.merge()
    check_base_fingerprint(record, src, names, "merged")  # shift and ΔW both inside W
    other_dtype = torch.bfloat16 if dtype == torch.float32 else torch.float32
    cast, _ = build(0, other_dtype)
    check_base_fingerprint(record, cast, names, "cast")  # the same base in another dtype
    different, _ = build(1, dtype)
    with pytest.raises(ValueError, match="other base weights"):
        check_base_fingerprint(record, different, names, "other")


def test_fingerprint_tracks_the_original_weight(make_tiny_gpt2):
    """Probes of a shifted Conv1D layer equal those of the unshifted weight (float64 check)."""
    model = adapted(make_tiny_gpt2(0), GPT2_TARGETS, shift=True)
    names = list(adapter_layers(model))
    plain = make_tiny_gpt2(0)
    a, b = base_fingerprint(model, names)["layers"], base_fingerprint(plain, names)["layers"]
    for name in names:
        assert a[name]["noise"] > b[name]["noise"] > 0  # the shift's rounding counted
        torch.testing.assert_close(
            torch.tensor(a[name]["probes"]), torch.tensor(b[name]["probes"]), rtol=0, atol=1e-6
        )
        assert a[name]["norm"] == pytest.approx(b[name]["norm"], rel=1e-3)  # for messages
        w = plain.get_submodule(name).weight.detach().double()
        assert b[name]["norm"] == pytest.approx(float(w.norm()), rel=1e-6)


SUBPROCESS = """
import json, torch
from torch import nn
from adarank.modules.base_fingerprint import base_fingerprint
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 48).to(torch.bfloat16))
print(json.dumps(base_fingerprint(model, ["0", "1"])))
"""


def test_fingerprint_is_identical_in_another_process():
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS], capture_output=True, text=True, check=True
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 48).to(torch.bfloat16))
    assert json.loads(out.stdout) == json.loads(json.dumps(base_fingerprint(model, ["0", "1"])))


@pytest.mark.parametrize("old", [None, "3f1a9c0b2d4e5f60"])  # missing, or the shapes-only hash
def test_files_without_a_weight_fingerprint_load_with_a_warning(
    make_tiny_bert, token_batch, tmp_path, old
):
    src = adapted(make_tiny_bert(0), BERT_TARGETS, shift=False)
    save_adapter(src, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("base_fingerprint")
    if old is not None:
        config["base_fingerprint"] = old
    path.write_text(json.dumps(config))
    dst = make_tiny_bert(1)  # cannot be verified, so not refused
    with pytest.warns(UserWarning, match="no base-weight fingerprint"):
        load_adapter(dst, tmp_path)
    assert {n: la.rank for n, la in adapter_layers(dst).items()} == {
        n: la.rank for n, la in adapter_layers(src).items()
    }
