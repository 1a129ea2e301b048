"""Quantized bases (``model.quantization``): adapters over packed weights, budgets, merge, export.

On the CPU the bitsandbytes layers are played by :class:`FakeLinear4bit`, an ``nn.Linear``
subclass that really stores its weight as packed 4-bit codes (two per byte, per-row scales in a
``quant_state``) and dequantizes in its forward; the export's dequantizer is pointed at it. The
same paths run on real bitsandbytes layers when the package is installed (its CPU kernels), and
the end-to-end 4-bit fit + merged export runs when CUDA is available.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adarank.cli import main
from adarank.config import ConfigError, load_config, validate_config
from adarank.export.merged import export_merged, merge_and_unwrap
from adarank.models import build_hf_model, build_tokenizer
from adarank.models import quantization as quant
from adarank.modules import adapter_layers, add_adapters, count_parameters
from adarank.modules.svd_lora import SVDLoRALinear, is_quantized, linear_shape

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
CUDA = torch.cuda.is_available()


class FakeQuantState:
    def __init__(self, scales: torch.Tensor, shape: torch.Size) -> None:
        self.scales, self.shape = scales, shape


class PackedParam(nn.Parameter):
    """uint8 storage of 4-bit codes with a ``quant_state`` (like bitsandbytes' Params4bit)."""

    def __new__(cls, data: torch.Tensor, quant_state: FakeQuantState):
        self = super().__new__(cls, data, requires_grad=False)
        self.quant_state = quant_state
        return self

    def __deepcopy__(self, memo):
        return PackedParam(self.data.clone(), copy.deepcopy(self.quant_state, memo))


class FakeLinear4bit(nn.Linear):
    """Symmetric 4-bit (codes −7..7, per-row absmax scale) linear layer with packed storage."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp_min(1e-12) / 7
        codes = (torch.round(w / scales[:, None]) + 8).to(torch.uint8).flatten()  # 1..15
        packed = (codes[0::2] | (codes[1::2] << 4)).reshape(-1, 1)
        self.weight = PackedParam(packed, FakeQuantState(scales, w.shape))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_dequantize(self).to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def fake_dequantize(module: nn.Module) -> torch.Tensor:
    packed = module.weight.data.flatten()
    codes = torch.stack([packed & 15, packed >> 4], 1).flatten().float() - 8
    state = module.weight.quant_state
    return codes.reshape(state.shape) * state.scales[:, None]


def _quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` (not ``skip``) by a FakeLinear4bit; returns their count."""
    names = [
        n for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in skip
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeLinear4bit(model.get_submodule(name)))
    return len(names)


def _tiny_llama() -> nn.Module:
    return build_hf_model("tiny-llama", task="causal_lm", seed=0)


def _set_lambdas(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g) * 0.5)


def test_fake_layer_is_a_faithful_4bit_linear() -> None:
    lin = nn.Linear(16, 8)
    q = FakeLinear4bit(lin)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 8 * 16 // 2
    err = (fake_dequantize(q) - lin.weight).abs().max() / lin.weight.abs().max()
    assert 0 < err <= 1 / 14 + 1e-6  # half a 4-bit step of the row scale
    x = torch.randn(3, 16)
    torch.testing.assert_close(q(x), x @ fake_dequantize(q).T + lin.bias)


def test_quantized_linear_keeps_its_logical_shape() -> None:
    q = FakeLinear4bit(nn.Linear(24, 10, bias=False))
    assert is_quantized(q) and not is_quantized(nn.Linear(24, 10))
    assert linear_shape(q) == (10, 24)
    layer = SVDLoRALinear(q, 4)
    assert (layer.d_out, layer.d_in, layer.max_rank) == (10, 24, 10)
    assert layer.lora_P.shape == (10, 4) and layer.lora_Q.shape == (4, 24)


def test_adapter_trains_over_the_packed_base_and_merge_is_refused() -> None:
    torch.manual_seed(0)
    q = FakeLinear4bit(nn.Linear(16, 12))
    packed = q.weight.detach().clone()
    layer = SVDLoRALinear(q, 3, factor_init="lora")
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), q(x))  # λ-init leaves the output unchanged
    layer.train()
    layer(x).pow(2).sum().backward()
    assert layer.lora_P.grad is not None and layer.lora_P.grad.abs().sum() > 0
    assert q.weight.grad is None and torch.equal(q.weight, packed)
    with pytest.raises(TypeError, match=r"cannot merge ΔW into the quantized base.*export"):
        layer.merge()
    with pytest.raises(TypeError, match=r"cannot shift the quantized base.*adapter.init"):
        layer.shift_base(torch.ones(12, 1), torch.ones(1, 16))
    assert not layer.merged and torch.equal(q.weight, packed)


def test_budgets_count_the_unquantized_base_parameters() -> None:
    model = _tiny_llama().requires_grad_(False)
    dense = sum(p.numel() for p in model.parameters())
    assert count_parameters(model)["base"] == dense
    n = _quantize_linears(model)
    assert n == 14  # 7 linear layers in each of the 2 decoder blocks
    stored = sum(p.numel() for p in model.parameters())
    assert stored < dense  # the packed storage holds half the weight elements
    assert count_parameters(model)["base"] == dense
    add_adapters(model, ["q_proj", "v_proj"], init_rank=2)
    counts = count_parameters(model)
    assert counts["base"] == dense
    assert counts["adapter"] == sum(la.live_params for la in adapter_layers(model).values())


@pytest.fixture
def fake_quantized_llama(monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    monkeypatch.setattr(quant, "dequantize_weight", fake_dequantize)
    model = _tiny_llama()
    _quantize_linears(model)
    add_adapters(model, ["q_proj", "v_proj", "down_proj"], init_rank=3, seed=0)
    _set_lambdas(model)
    return model.eval()


def test_merge_and_unwrap_dequantizes_every_quantized_layer(fake_quantized_llama) -> None:
    model = fake_quantized_llama
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plain = merge_and_unwrap(model, dtype="float32")
    assert adapter_layers(model)  # a copy was merged
    assert not any(isinstance(m, (SVDLoRALinear, FakeLinear4bit)) for m in plain.modules())
    assert sum(type(m) is nn.Linear for m in plain.modules()) == 15  # 14 + the tied head
    with torch.no_grad():
        out = plain(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # the adapter matters: the dequantized base alone gives other logits
    for layer in adapter_layers(model).values():
        layer.lora_lambda.data.zero_()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3


def test_export_merged_writes_a_plain_model_in_the_chosen_dtype(
    fake_quantized_llama, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = fake_quantized_llama
    model.config.quantization_config = {"quant_method": "bitsandbytes"}  # as from_pretrained sets
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = export_merged(model, tmp_path / "m32", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, atol=2e-5, rtol=1e-5)
    out16 = export_merged(model, tmp_path / "m16", dtype="bfloat16")
    loaded16 = AutoModelForCausalLM.from_pretrained(out16, dtype="auto")
    assert {p.dtype for p in loaded16.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"export dtype 'int4'"):
        merge_and_unwrap(model, dtype="int4")


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_real_bitsandbytes_layers_on_the_cpu() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantizes
    assert is_quantized(q) and linear_shape(q) == (32, 64)
    W = quant.dequantize_weight(q)
    assert W.shape == (32, 64) and 0 < (W - dense.weight).norm() / dense.weight.norm() < 0.15
    x = torch.randn(4, 64)
    torch.testing.assert_close(q(x), x @ W.T + dense.bias, atol=1e-4, rtol=1e-4)
    model = nn.Sequential(q, nn.ReLU(), nn.Linear(32, 8)).requires_grad_(False)
    assert count_parameters(model)["base"] == 64 * 32 + 32 + 32 * 8 + 8
    add_adapters(model, ["0"], init_rank=4, seed=0)
    _set_lambdas(model)
    with pytest.raises(TypeError, match="quantized base"):
        model[0].merge()
    with torch.no_grad():
        ref = model(x)
        plain = merge_and_unwrap(model, dtype="float32")
        torch.testing.assert_close(plain(x), ref, atol=1e-4, rtol=1e-4)
    assert type(plain[0]) is nn.Linear


# ---------------------------------------------------------------------------- pre-flight


def test_quantization_problems_name_the_key_and_the_reasons(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problems = quant.quantization_problems("4bit", name_or_path="smollm2", init="svd")
    text = "\n".join(problems)
    assert "model.quantization='4bit': bitsandbytes quantization needs a CUDA GPU" in text
    assert "is read from a GGUF file" in text and "save_pretrained" in text
    assert "adapter.init='svd'" in text
    if not HAS_BNB:
        assert "bitsandbytes>=0.46.1" in text and "pip install 'adarank[quant]'" in text
    assert quant.quantization_problems(None, name_or_path="tiny-llama") == []
    assert "expected one of ['4bit', '8bit']" in quant.quantization_problems("3bit")[0]
    with pytest.raises(ValueError, match=r"model.name_or_path='tiny-llama' is built in code"):
        build_hf_model("tiny-llama", task="causal_lm", quantization="4bit")


def _saved_tiny_gpt2(path: Path) -> Path:
    build_hf_model("tiny-gpt2", task="causal_lm").save_pretrained(path)
    build_tokenizer("tiny-gpt2").save_pretrained(path)
    return path


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_validate_and_fit_of_a_quantized_config_exit_2_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = _saved_tiny_gpt2(tmp_path / "gpt2")
    args = ["causal_lm", f"model.name_or_path={model_dir}", "model.quantization=4bit"]
    args += ["trainer.accelerator=gpu", f"run.dir={tmp_path / 'run'}"]
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert "model.quantization='4bit'" in err and "CUDA GPU" in err, err
    if not HAS_BNB:
        assert "bitsandbytes>=0.46.1" in err and "adarank[quant]" in err, err
    assert main(["fit", *args]) == 2
    assert "model.quantization='4bit'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_validate_names_quantization_conflicts(monkeypatch) -> None:
    monkeypatch.setattr(quant, "_missing_packages", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = ["model.name_or_path=./models/any", "model.quantization=8bit"]
    cfg = load_config("causal_lm", [*base, "adapter.init=covariance", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    text = str(info.value)
    assert "adapter.init='covariance' moves part of the base weight" in text
    assert "trainer.accelerator='cpu': the quantized base" in text
    assert "CUDA" not in text
    cfg = load_config("causal_lm", ["model.quantization=2bit"])
    with pytest.raises(ConfigError, match=r"model.quantization='2bit'"):
        validate_config(cfg)


# ---------------------------------------------------------------------------- CUDA


RECIPE = """\
description: "4-bit tiny Llama (test)"
defaults: [model/tiny_llama, data/text_lm, adapter/llama, schedule/adaptive, trainer/cpu,
  logger/default]
seed: 0
model:
  name_or_path: {model_dir}
  quantization: 4bit
adapter:
  budget: 6000
schedule:
  interval: 2
optimizer:
  lr: 5.0e-3
trainer:
  accelerator: gpu
  max_epochs: -1
  max_steps: 12
  val_check_interval: 12
  check_val_every_n_epoch: null
  enable_progress_bar: false
logger:
  wandb: false
"""


@pytest.mark.skipif(not (CUDA and HAS_BNB), reason="needs CUDA and bitsandbytes")
def test_4bit_fit_and_merged_export_match_on_cuda(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from adarank.runs import load_run

    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "llama"
    build_hf_model("tiny-llama", task="causal_lm").save_pretrained(model_dir)
    build_tokenizer("tiny-llama").save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"the quick brown fox {i} jumps over the dog" for i in range(80)))
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(model_dir=model_dir))
    run = tmp_path / "run"
    args = [f"run.dir={run}", f"data.train_file={text}", "data.block_size=32", "data.val_size=8"]
    assert main(["fit", str(recipe), *args]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["adapter_params"] <= 6000
    loaded = load_run(run).model.eval()
    assert any(is_quantized(m) for m in loaded.modules() if isinstance(m, nn.Linear))
    ids = torch.randint(5, 200, (2, 16), device="cuda")
    with torch.no_grad():
        ref = loaded(input_ids=ids).logits.float()
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").cuda().eval()
    assert not any(is_quantized(m) for m in merged.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        out = merged(input_ids=ids).logits.float()
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
