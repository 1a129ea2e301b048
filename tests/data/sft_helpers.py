"""Shared helpers of the SFT data tests: byte tokenizers with pad == eos, row files, masks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import adarank.models.hf as hf
from adarank.data import SFTDataModule

BUILD_TOKENIZER = hf.build_tokenizer  # the real one, before any test patches it
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", re.DOTALL)
PAIRS = [
    {"prompt": "Is it good?", "response": "yes"},
    {"prompt": "Name a colour.", "response": "blue, like the sea on a clear day"},
    {"prompt": "Count to three.", "response": "one two three"},
    {"prompt": "Say nothing much.", "response": "ok"},
    {"prompt": "Capital of France?", "response": "Paris"},
    {"prompt": "2 + 2?", "response": "4"},
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks"},
    ],
    [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}],
    [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
        {"role": "assistant", "content": "D and E"},
    ],
]


def byte_tokenizer(kind: str):
    """``"plain"``: byte tokenizer, no chat template, pad = eos = ``<|endoftext|>``;
    ``"chatml"``: plus special ``<|im_start|>``/``<|im_end|>``, pad = eos = ``<|im_end|>`` and
    a ChatML template; ``"chatml-eos"``: the same template but eos stays ``<|endoftext|>``."""
    tok = BUILD_TOKENIZER("tiny-gpt2")
    if kind != "plain":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        if kind == "chatml":
            tok.eos_token = "<|im_end|>"
    tok.pad_token = tok.eos_token
    return tok


def tokenizer_installer(monkeypatch: pytest.MonkeyPatch):
    """``install(kind) -> tokenizer``: every datamodule built afterwards uses that tokenizer."""

    def install(kind: str):
        monkeypatch.setattr(hf, "build_tokenizer", lambda name: byte_tokenizer(kind))
        return byte_tokenizer(kind)

    return install


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def datamodule(path: Path, tmp_path: Path, **kw) -> SFTDataModule:
    """Train and validate on the same file (validation keeps the file order)."""
    kw.setdefault("max_length", 512)
    kw.setdefault("batch_size", 2)
    dm = SFTDataModule(
        "byte", train_file=str(path), val_file=str(path), cache_dir=str(tmp_path / "hf"), **kw
    )
    dm.setup()
    return dm


def expected_from_text(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list, list]:
    """Token ids of ``text`` and labels: ids whose characters lie in a span, else -100."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(s <= a and b <= e for s, e in spans) else -100
        for t, (a, b) in zip(ids, enc["offset_mapping"])
    ]
    labels[0] = -100
    return ids, labels


def chatml_expected(tok, conv: list[dict]) -> tuple[list, list]:
    """Labels of a ChatML rendering: each assistant content and its ``<|im_end|>``."""
    text = tok.apply_chat_template(conv, tokenize=False)
    spans = [(m.start(1), m.end(0)) for m in ASSISTANT_SPAN.finditer(text)]
    return expected_from_text(tok, text, spans)


def plain_expected(tok, conv: list[dict]) -> tuple[list, list]:
    """Labels of the documented plain template, rendered here from its definition."""
    text, spans = "", []
    for i, m in enumerate(conv):
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "### Instruction:\n" + m["content"] + "\n\n"
        else:
            text += "### Response:\n"
            spans.append((len(text), len(text) + len(m["content"]) + len(tok.eos_token)))
            text += m["content"] + tok.eos_token + ("\n\n" if i < len(conv) - 1 else "")
    return expected_from_text(tok, text, spans)


def pair_conversation(row: dict) -> list[dict]:
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]
