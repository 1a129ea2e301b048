"""add_adapters on real transformers models: matching, freezing, merging, end-to-end training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adarank.modules import (
    SVDLoRALinear,
    adapter_layers,
    add_adapters,
    count_parameters,
    merge_adapters,
    unmerge_adapters,
)
from adarank.modules.inject import saved_modules

BERT_LAYERS = [f"bert.encoder.layer.{i}" for i in range(2)]


def bert_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def set_random_lambdas(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g))


def test_glob_pattern_selects_query_layers(make_tiny_bert):
    model = make_tiny_bert()
    layers = add_adapters(model, "*query", 2)
    assert list(layers) == [f"{p}.attention.self.query" for p in BERT_LAYERS]
    assert all(isinstance(model.get_submodule(n), SVDLoRALinear) for n in layers)
    assert layers == adapter_layers(model)


def test_regex_and_plain_suffix_patterns(make_tiny_bert):
    model = make_tiny_bert()
    layers = add_adapters(model, [r"re:.*self\.(query|value)", "intermediate.dense"], 1)
    expected = {
        f"{p}.{s}"
        for p in BERT_LAYERS
        for s in ("attention.self.query", "attention.self.value", "intermediate.dense")
    }
    assert set(layers) == expected
    # a plain name also matches the whole name, and a regex must match the whole name
    model = make_tiny_bert()
    assert list(add_adapters(model, "classifier", 1)) == ["classifier"]
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="matched no module"):
        add_adapters(model, "re:query", 1)


def test_plain_names_match_whole_name_components():
    model = nn.ModuleDict(
        {
            "query": nn.Linear(4, 4),
            "subquery": nn.Linear(4, 4),
            "block": nn.Sequential(nn.Linear(4, 4)),
        }
    )
    assert list(add_adapters(model, "query", 1)) == ["query"]  # not "subquery"
    model = nn.ModuleDict({"block": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))})
    assert list(add_adapters(model, "block.2", 1)) == ["block.2"]
    assert isinstance(model["block"][2], SVDLoRALinear)


def test_gpt2_conv1d_targets_and_mlp_glob(make_tiny_gpt2):
    model = make_tiny_gpt2()
    layers = add_adapters(model, "*.mlp.*", 2)  # skips mlp.act and mlp.dropout
    assert set(layers) == {
        f"transformer.h.{i}.mlp.{s}" for i in range(2) for s in ("c_fc", "c_proj")
    }
    assert all(isinstance(m.base_layer, Conv1D) and m.transposed for m in layers.values())
    fc = layers["transformer.h.0.mlp.c_fc"]
    assert (fc.d_in, fc.d_out) == (32, 128)


def test_no_match_lists_candidate_linear_layers(make_tiny_bert):
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="matched no module") as err:
        add_adapters(model, ["q_proj", "*v_proj"], 2)
    assert "bert.encoder.layer.0.attention.self.query" in str(err.value)
    assert "classifier" in str(err.value)
    assert "LayerNorm" not in str(err.value)  # only linear layers are candidates
    assert not adapter_layers(model)


def test_non_linear_match_names_module_and_type(make_tiny_bert):
    model = make_tiny_bert()
    with pytest.raises(TypeError, match=r"bert\.embeddings\.LayerNorm.*LayerNorm"):
        add_adapters(model, "embeddings.LayerNorm", 2)
    with pytest.raises(
        TypeError, match=r"bert\.encoder\.layer\.0\.attention\.self.*BertSelfAttention"
    ):
        add_adapters(model, "*.attention.self", 2)  # a glob matching only non-linear modules
    assert not adapter_layers(model)


def test_bad_arguments(make_tiny_bert):
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="target_modules is empty"):
        add_adapters(model, [], 2)
    with pytest.raises(TypeError, match="target_modules"):
        add_adapters(model, ["query", 3], 2)
    with pytest.raises(ValueError, match="not among the matched"):
        add_adapters(model, "query", {"bert.encoder.layer.0.attention.self.key": 2})
    with pytest.raises(ValueError, match="matched no module"):
        add_adapters(model, "query", 2, modules_to_save="no_such_head")
    model = make_tiny_bert()
    add_adapters(model, "query", 2)
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model, "value", 2)


def test_per_layer_init_rank_and_max_rank(make_tiny_bert):
    model = make_tiny_bert()
    q0, q1 = (f"{p}.attention.self.query" for p in BERT_LAYERS)
    layers = add_adapters(model, "query", {q0: 3}, max_rank=5)
    assert layers[q0].rank == 3 and layers[q1].rank == 0  # unlisted layers start empty
    assert layers[q0].max_rank == layers[q1].max_rank == 5
    layers = add_adapters(make_tiny_bert(), "intermediate.dense", 8)
    assert all(layer.max_rank == 32 for layer in layers.values())  # min(d_in, d_out)


def test_seeded_init_is_deterministic(make_tiny_bert):
    a = add_adapters(make_tiny_bert(), "query", 2, seed=3)
    b = add_adapters(make_tiny_bert(), "query", 2, seed=3)
    for name in a:
        assert torch.equal(a[name].lora_P, b[name].lora_P)
        assert torch.equal(a[name].lora_Q, b[name].lora_Q)


def test_injection_is_identity_at_init(make_tiny_bert, make_tiny_gpt2, token_batch):
    ids = token_batch()
    bert = make_tiny_bert()
    before = bert_logits(bert, ids)
    add_adapters(bert, ["query", "value", "dense"], 4)
    assert torch.equal(bert_logits(bert, ids), before)
    gpt2 = make_tiny_gpt2()
    before = gpt2(input_ids=ids).logits
    add_adapters(gpt2, ["c_attn", "c_proj", "c_fc"], 4)
    assert torch.equal(gpt2(input_ids=ids).logits, before)


def test_only_adapters_and_saved_modules_train(make_tiny_bert, token_batch):
    model = make_tiny_bert()
    layers = add_adapters(model, ["query", "value"], 2, modules_to_save="classifier")
    set_random_lambdas(model)
    expected = {f"{n}.{p}" for n in layers for p in ("lora_P", "lora_lambda", "lora_Q")}
    expected |= {"classifier.weight", "classifier.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    loss = nn.functional.cross_entropy(
        bert_logits(model, token_batch()), torch.tensor([0, 1, 0, 1])
    )
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    counts = count_parameters(model)
    assert counts["adapter"] == 4 * 2 * (32 + 32 + 1)
    assert counts["saved"] == 32 * 2 + 2
    assert counts["adapter"] + counts["saved"] + counts["base"] == sum(
        p.numel() for p in model.parameters()
    )


def test_nested_modules_to_save(make_tiny_bert):
    model = make_tiny_bert()
    add_adapters(model, "query", 1, modules_to_save=["bert.pooler", "*pooler*"])
    assert saved_modules(model) == ["bert.pooler"]  # outermost match only
    assert model.bert.pooler.dense.weight.requires_grad
    with pytest.raises(ValueError, match="contains adapter layer"):
        add_adapters(make_tiny_bert(), "query", 1, modules_to_save="encoder.layer.0")
    with pytest.raises(ValueError, match="both an adapter target"):
        add_adapters(make_tiny_bert(), "classifier", 1, modules_to_save="classifier")


def test_merge_and_unmerge_whole_model(make_tiny_gpt2, token_batch):
    model = make_tiny_gpt2()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, ["c_attn", "c_proj", "c_fc"], 3)
    set_random_lambdas(model)
    ids = token_batch()
    y = model(input_ids=ids).logits
    merge_adapters(model)
    merge_adapters(model)
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(
            layer.base_layer.weight, base_state[f"{name}.weight"], atol=1e-6, rtol=0
        )
    torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def _train(model: nn.Module, loss_fn, steps: int = 20, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_adapters_carry_the_fit(model: nn.Module, loss_fn, margin: float = 0.05) -> None:
    """Zeroing every λ after training (back to the base function) must raise the loss."""
    model.eval()
    with torch.no_grad():
        trained = loss_fn().item()
        for layer in adapter_layers(model).values():
            layer.lora_lambda.zero_()
        assert loss_fn().item() > trained + margin


def test_bert_end_to_end_training_lowers_loss(make_tiny_bert, token_batch):
    model = make_tiny_bert()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "classifier" not in k}
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
    targets.append(r"re:.*layer\.\d\.output\.dense")
    add_adapters(model, targets, 4, modules_to_save="classifier")
    ids, labels = token_batch(batch=8), torch.tensor([0, 1] * 4)

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(bert_logits(model, ids), labels)

    losses = _train(model, loss_fn)
    assert losses[-1] < 0.9 * losses[0], losses  # observed ≈0.77×
    for name, layer in adapter_layers(model).items():  # base weights never moved
        assert torch.equal(layer.base_layer.weight, frozen[f"{name}.weight"])
    assert_adapters_carry_the_fit(model, loss_fn)


def test_gpt2_end_to_end_training_lowers_loss(make_tiny_gpt2, token_batch):
    model = make_tiny_gpt2()
    layers = add_adapters(model, ["c_attn", "c_proj", "c_fc"], 4)
    assert len(layers) == 8  # c_proj matches attn.c_proj and mlp.c_proj
    ids = token_batch(batch=4, seq=12)
    losses = _train(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.1, losses  # observed ≈ −0.24 nats (adapters only)
    model.eval()
    y = model(input_ids=ids).logits
    merge_adapters(model)
    torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    assert_adapters_carry_the_fit(model, lambda: model(input_ids=ids, labels=ids).loss, 0.1)
