"""``target_modules="all-linear"`` on tiny random decoders of eight architectures.

The expected set is computed independently of names and of ``get_output_embeddings``: every
``nn.Linear``/``Conv1D`` except the one whose output dimension is the vocabulary (a vocabulary
size no other layer has).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adarank.allocation import BudgetSchedule, RankController
from adarank.modules import add_adapters, merge_adapters, unmerge_adapters
from adarank.modules.svd_lora import is_conv1d, linear_shape

VOCAB = 97  # no hidden/intermediate/projection size equals it
ARCHS = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gemma": {"head_dim": 16},
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 32},  # project_in / project_out
    "gpt2": {"n_inner": 128},  # Conv1D layers
}


def _model(arch: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **ARCHS[arch],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _expected(model: nn.Module) -> set[str]:
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    heads = {n for n, m in linear.items() if linear_shape(m)[0] == VOCAB}
    assert len(heads) == 1
    return set(linear) - heads


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_linear_adapts_every_linear_layer_but_the_head(arch: str) -> None:
    model = _model(arch)
    expected = _expected(model)
    ids = _ids(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        base_other = model(input_ids=_ids(1)).logits
    layers = add_adapters(model, "all-linear", 4, scaling=16.0, seed=0)
    assert set(layers) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}" for n in expected for p in ("P", "lambda", "Q")}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # λ = 0 at init

    total = sum(layer.live_params for layer in layers.values())
    schedule = BudgetSchedule(total // 2, total_steps=6, warmup_steps=1, final_steps=1, interval=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = RankController(layers, schedule, optimizer=opt, seed=0)
    model.train()
    losses = []
    for step in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss.detach()))
        loss.backward()
        controller.observe()
        opt.step()
        controller.step(step + 1)
        opt.zero_grad()
    assert losses[-1] < losses[0] - 1e-3
    assert controller.live_params() <= total // 2 and controller.history

    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=_ids(1)).logits
        merge_adapters(model)
        merged = model(input_ids=_ids(1)).logits
        unmerge_adapters(model)
    assert not torch.allclose(unmerged, base_other, atol=1e-3)  # training moved the outputs
    assert torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_all_linear_skips_modules_to_save() -> None:
    from transformers import AutoModelForSequenceClassification

    from adarank.models.llm import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB, 3))
    assert model.get_output_embeddings() is None  # a classifier has no LM head to skip
    layers = add_adapters(model, "all-linear", 2, modules_to_save=["score"], seed=0)
    assert "score" not in layers and len(layers) == 14
    assert model.score.weight.requires_grad
    with_head = add_adapters(
        AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB, 3)),
        "all-linear",
        2,
    )
    assert "score" in with_head  # without modules_to_save the head is a plain linear layer


def test_all_linear_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="all-linear"):
        add_adapters(_model("llama"), ["all-linear", "q_proj"], 2)
