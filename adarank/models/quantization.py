"""Quantized frozen bases (QLoRA-style): ``model.quantization: 4bit | 8bit`` through bitsandbytes.

The base model is loaded by ``from_pretrained`` with a ``BitsAndBytesConfig``: ``"4bit"`` stores
every linear layer but the output head as NF4 (double-quantized block scales), ``"8bit"`` as
LLM.int8(); the embeddings, norms and head stay in ``model.dtype``, which is also the dtype the
quantized layers compute in. Adapters wrap the quantized layers like any ``nn.Linear`` and stay in
``adapter.dtype`` (float32 by default). Percentage budgets count the unquantized parameters
(``d_out · d_in`` per quantized layer, see :func:`adarank.modules.count_parameters`).

bitsandbytes is an optional extra (``pip install 'adarank[quant]'``) and needs a CUDA GPU; it is
imported only when a quantized model is loaded or dequantized. :func:`quantization_problems`
is the one check of a quantized config (shared by ``validate``, ``fit`` and
:func:`~adarank.models.build_hf_model`).

A quantized weight cannot take ΔW in place (the merge would round it back to 4 bits):
``SVDLoRALinear.merge`` refuses, and the merged export first replaces every quantized layer by a
plain ``nn.Linear`` holding its dequantized weight in the export dtype
(:func:`dequantize_linears`), then merges ΔW into that.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any, Literal

import torch
from torch import nn

from adarank.modules.svd_lora import is_quantized

__all__ = [
    "BASE_EDITING_INITS",
    "INSTALL_HINT",
    "MIN_BITSANDBYTES",
    "QUANTIZATIONS",
    "QuantizationName",
    "bnb_config",
    "check_quantization",
    "dequantize_linears",
    "dequantize_weight",
    "quantization_problems",
    "quantized_linear_names",
]

#: ``model.quantization`` values (None: the base in ``model.dtype``)
QUANTIZATIONS = ("4bit", "8bit")
QuantizationName = Literal[QUANTIZATIONS]  # the config annotation of model.quantization
#: the oldest bitsandbytes that transformers' quantizers accept
MIN_BITSANDBYTES = "0.46.1"
INSTALL_HINT = "pip install 'adarank[quant]'"
#: ``adapter.init`` strategies that read the base weight and move a piece of it into the adapter
#: (``layer.shift_base``): impossible on a quantized weight
BASE_EDITING_INITS = ("svd", "covariance")


def _missing_packages() -> list[str]:
    """The packages transformers' bitsandbytes quantizer needs that are not installed."""
    from packaging.version import Version

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append(f"bitsandbytes>={MIN_BITSANDBYTES}")
    elif Version(importlib.metadata.version("bitsandbytes")) < Version(MIN_BITSANDBYTES):
        found = importlib.metadata.version("bitsandbytes")
        missing.append(f"bitsandbytes>={MIN_BITSANDBYTES} (found {found})")
    if importlib.util.find_spec("accelerate") is None:
        missing.append("accelerate")
    return missing


def quantization_problems(
    quantization: Any,
    *,
    name_or_path: Any = None,
    gguf_file: Any = None,
    init: Any = None,
    accelerator: Any = None,
) -> list[str]:
    """Everything that stops ``model.quantization`` from working here (empty when it can).

    Args:
        quantization: the ``model.quantization`` value (None: nothing to check).
        name_or_path: ``model.name_or_path`` (built-ins cannot be quantized on load).
        gguf_file: ``model.gguf_file`` (a GGUF checkpoint cannot be quantized on load).
        init: ``adapter.init`` (strategies that edit the base weight are refused).
        accelerator: ``trainer.accelerator`` (the quantized base lives on the GPU).

    Returns:
        one message per problem, each naming the key, the value and what is expected.
    """
    if quantization is None:
        return []
    key = f"model.quantization={quantization!r}"
    if quantization not in QUANTIZATIONS:
        return [f"{key}: expected one of {list(QUANTIZATIONS)} or null"]
    from adarank.models.hf import TINY_MODELS
    from adarank.models.llm import GGUF_BUILTINS

    problems = []
    env = []
    if not torch.cuda.is_available():
        env.append("a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    missing = _missing_packages()
    if missing:
        env.append(f"the packages {', '.join(missing)} ({INSTALL_HINT})")
    if env:
        problems.append(
            f"{key}: bitsandbytes quantization needs {' and '.join(env)}; set "
            "model.quantization=null to train on the unquantized base"
        )
    if name_or_path in TINY_MODELS or name_or_path in GGUF_BUILTINS:
        how = "is built in code" if name_or_path in TINY_MODELS else "is read from a GGUF file"
        problems.append(
            f"{key}: model.name_or_path={name_or_path!r} {how} and cannot be quantized on "
            "load; save it as a model directory first (build_hf_model(...).save_pretrained(dir) "
            "and its tokenizer) and set model.name_or_path to that directory"
        )
    elif gguf_file is not None:
        problems.append(
            f"{key}: model.gguf_file={gguf_file!r}: transformers cannot quantize a GGUF "
            "checkpoint on load; use a safetensors model directory or hub id"
        )
    if init in BASE_EDITING_INITS:
        problems.append(
            f"adapter.init={init!r} moves part of the base weight into the adapter, which a "
            f"quantized base ({key}) cannot store; use lora, activations or gradient"
        )
    if isinstance(accelerator, str) and accelerator == "cpu":
        problems.append(
            f"trainer.accelerator='cpu': the quantized base ({key}) lives on the GPU; set "
            "trainer.accelerator=gpu"
        )
    return problems


def check_quantization(quantization: Any, **context: Any) -> None:
    """Raise ``ValueError`` with every :func:`quantization_problems` message (if any)."""
    problems = quantization_problems(quantization, **context)
    if problems:
        raise ValueError("; ".join(problems))


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of a ``model.quantization`` value.

    ``"4bit"``: NF4 with double quantization, computing in ``compute_dtype``; ``"8bit"``:
    LLM.int8().
    """
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization={quantization!r}: expected one of {list(QUANTIZATIONS)}")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"dequantizing a quantized layer needs bitsandbytes: {INSTALL_HINT}"
        ) from err
    return bitsandbytes


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense ``(d_out, d_in)`` weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

    Raises:
        TypeError: ``module`` is not a quantized bitsandbytes linear layer.
    """
    bnb = _bitsandbytes()
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit: packed NF4/FP4 codes + block scales
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU kernel layout
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scb is not None:  # Int8Params: int8 rows + row scales
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    raise TypeError(
        f"{type(module).__name__} is not a quantized bitsandbytes linear layer (weight "
        f"{type(weight).__name__} of dtype {weight.dtype})"
    )


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the quantized linear layers of ``model`` (adapter bases included)."""
    return [
        n for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and is_quantized(m)
    ]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace every quantized linear layer by a plain ``nn.Linear`` of ``dtype``, in place.

    The new layer holds :func:`dequantize_weight` (and the bias) cast to ``dtype`` on the same
    device; an adapter layer's ``base_layer`` is replaced the same way, so ΔW can then be merged.
    Transformers' quantization attributes are removed from the model and its config, so
    ``save_pretrained`` writes a plain model.

    Returns:
        the names of the replaced layers.
    """
    names = quantized_linear_names(model)
    for name in names:
        old = model.get_submodule(name)
        with torch.no_grad():
            weight = dequantize_weight(old).to(dtype)
            new = nn.Linear(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
            new.weight.copy_(weight.reshape(old.out_features, old.in_features))
            if old.bias is not None:
                new.bias.copy_(old.bias.to(dtype))
        new.requires_grad_(False)
        _set_submodule(model, name, new)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return names
