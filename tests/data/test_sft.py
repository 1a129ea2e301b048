"""SFT datamodule: loss masks (plain and chat templates), packing, generation prompts, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sft_helpers import (
    CONVERSATIONS,
    PAIRS,
    byte_tokenizer,
    chatml_expected,
    datamodule,
    pair_conversation,
    plain_expected,
    tokenizer_installer,
    write_jsonl,
)

from adarank.data import SFTDataModule
from adarank.data.sft import pack_examples
from adarank.data.sft_render import encode, stop_token_ids
from adarank.lightning.tasks import run_task
from adarank.models import build_hf_model

EXPECTED = {"plain": plain_expected, "chatml": chatml_expected}


@pytest.fixture
def use_tokenizer(monkeypatch: pytest.MonkeyPatch):
    return tokenizer_installer(monkeypatch)


def _item(dm, i: int) -> tuple[list[int], list[int]]:
    item = dm.val_set[i]
    return item["input_ids"].tolist(), item["labels"].tolist()


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_pair_labels_are_exactly_the_response(tmp_path: Path, use_tokenizer, kind: str) -> None:
    tok = use_tokenizer(kind)
    dm = datamodule(write_jsonl(tmp_path / "d.jsonl", PAIRS), tmp_path)
    assert dm.template_used == ("chat" if kind == "chatml" else "plain")
    assert len(dm.val_set) == len(PAIRS)
    for i, row in enumerate(PAIRS):
        ids, labels = _item(dm, i)
        assert (ids, labels) == EXPECTED[kind](tok, pair_conversation(row))
        labelled = [t for t in labels if t != -100]
        assert tok.decode(labelled) == row["response"] + tok.eos_token  # response + end of turn
    assert dm.stop_token_ids == [tok.eos_token_id]


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_padding_is_masked_although_pad_is_eos(tmp_path: Path, use_tokenizer, kind) -> None:
    tok = use_tokenizer(kind)
    assert tok.pad_token_id == tok.eos_token_id
    dm = datamodule(write_jsonl(tmp_path / "d.jsonl", PAIRS), tmp_path, eval_batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for b in range(3):
        ids, labels = _item(dm, b)
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["labels"][b, :n].tolist() == labels
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == -100).all()
        # the closing eos is a target, the padding (same id) is not
        assert [t for t in labels if t != -100][-1] == tok.eos_token_id


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_multi_turn_masks_every_non_assistant_turn(tmp_path: Path, use_tokenizer, kind) -> None:
    tok = use_tokenizer(kind)
    rows = [{"messages": c} for c in CONVERSATIONS]
    dm = datamodule(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path)
    for i, conv in enumerate(CONVERSATIONS):
        ids, labels = _item(dm, i)
        assert (ids, labels) == EXPECTED[kind](tok, conv)
        runs, cur = [], []
        for t in labels + [-100]:
            if t != -100:
                cur.append(t)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        answers = [m["content"] + tok.eos_token for m in conv if m["role"] == "assistant"]
        assert runs == answers


def test_chat_span_ends_at_the_end_of_turn_token(tmp_path: Path, use_tokenizer) -> None:
    """eos (<|endoftext|>) differs from the template's <|im_end|>: both stop, the "\\n" after
    <|im_end|> is scaffolding."""
    tok = use_tokenizer("chatml-eos")
    dm = datamodule(write_jsonl(tmp_path / "d.jsonl", PAIRS), tmp_path)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert dm.stop_token_ids == [tok.eos_token_id, im_end]
    ids, labels = _item(dm, 0)
    assert tok.decode([t for t in labels if t != -100]) == "yes<|im_end|>"
    assert tok.decode(ids[-1:]) == "\n" and labels[-1] == -100


def test_system_prompt_is_masked(tmp_path: Path, use_tokenizer) -> None:
    tok = use_tokenizer("chatml")
    dm = datamodule(write_jsonl(tmp_path / "d.jsonl", PAIRS), tmp_path, system_prompt="Be kind.")
    conv = [{"role": "system", "content": "Be kind."}, *pair_conversation(PAIRS[0])]
    assert _item(dm, 0) == chatml_expected(tok, conv)
    assert dm.generation_examples(1)[0]["prompt"].startswith("<|im_start|>system\nBe kind.")


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_generation_examples_match_training_prompts(tmp_path: Path, use_tokenizer, kind) -> None:
    tok = use_tokenizer(kind)
    long = {"prompt": "Recite.", "response": " ".join(["word"] * 20)}
    rows = [{"messages": c} for c in CONVERSATIONS] + [{"messages": pair_conversation(long)}]
    dm = datamodule(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path)
    examples = dm.generation_examples()
    assert len(examples) == len(rows) and dm.generation_examples(2) == examples[:2]
    for i, ex in enumerate(examples):
        ids, labels = _item(dm, i)
        k = len(ex["prompt_ids"])
        assert ids[:k] == ex["prompt_ids"]
        assert tok.decode(ex["prompt_ids"]) == ex["prompt"]
        # the prompt is everything before the last response: its first token is the next target
        conv = rows[i]["messages"]
        assert ex["reference"] == conv[-1]["content"].strip()
        assert tok.decode(ids[k:]).startswith(ex["reference"])
        assert labels[k] == ids[k] and labels[k - 1] == -100
    assert [ex["short"] for ex in examples] == [True, True, True, False]


def test_packing_preserves_examples_and_labels(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS * 4)
    plain = datamodule(path, tmp_path, max_length=128)
    packed = datamodule(path, tmp_path, max_length=128, packing=True)
    seqs = [packed.train_set[i] for i in range(len(packed.train_set))]
    assert packed.report["train/packed_sequences"] == len(seqs) < len(plain.train_set)
    assert packed.report["train/response_tokens"] == plain.report["train/response_tokens"]
    n_labels = sum(int((s["labels"] != -100).sum()) for s in seqs)
    assert n_labels == plain.report["train/response_tokens"]
    # the packed sequences are the examples in order, positions restarting per example
    examples = [plain.train_set[i] for i in range(len(plain.train_set))]
    assert torch.equal(
        torch.cat([s["input_ids"] for s in seqs]), torch.cat([e["input_ids"] for e in examples])
    )
    assert torch.equal(
        torch.cat([s["labels"] for s in seqs]), torch.cat([e["labels"] for e in examples])
    )
    starts = torch.cat([s["position_ids"] for s in seqs]) == 0
    assert int(starts.sum()) == len(examples) and all(len(s["input_ids"]) <= 128 for s in seqs)
    batch = next(iter(packed.train_dataloader()))
    assert batch["position_ids"].shape == batch["input_ids"].shape


def test_pack_examples_is_greedy() -> None:
    ex = [([1] * 3, [-100] * 3), ([2] * 4, [2] * 4), ([3] * 2, [3] * 2), ([4] * 5, [-100] * 5)]
    out = pack_examples(ex, 7)
    assert [s[0] for s in out] == [[1, 1, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4]]
    assert out[1][2] == [0, 1, 0, 1, 2, 3, 4]


def test_training_order_resumes_mid_epoch(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS * 3)

    def loader():
        dm = SFTDataModule(
            "byte",
            train_file=str(path),
            val_size=4,
            batch_size=2,
            seed=5,
            cache_dir=str(tmp_path / "hf"),
        )
        dm.setup()
        return dm.train_dataloader()

    reference = [b["input_ids"].tolist() for b in loader()]
    first, it = loader(), None
    it = iter(first)
    seen = [next(it)["input_ids"].tolist() for _ in range(3)]
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    rest = [b["input_ids"].tolist() for b in second]
    assert seen + rest == reference and len(reference) == 7


def test_batches_train_a_tiny_causal_lm(tmp_path: Path, use_tokenizer) -> None:
    """The causal_lm task trains on exactly the response tokens, packed or not."""
    use_tokenizer("plain")
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    model = build_hf_model("tiny-gpt2", task="causal_lm")
    for packing in (False, True):
        dm = datamodule(path, tmp_path, max_length=96, packing=packing)
        batch = next(iter(dm.train_dataloader()))
        out = run_task("causal_lm", model, batch)
        assert torch.isfinite(out.loss)
        assert out.weight == int((batch["labels"][:, 1:] != -100).sum()) > 0


def test_position_zero_is_never_a_target() -> None:
    """A template whose generation prompt renders to nothing: the response starts at 0."""
    tok = byte_tokenizer("plain")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conv = [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]
    (ex,) = encode(tok, [conv], "chat", ["row 1"], stop_token_ids(tok, "chat"))
    assert ex.input_ids == tok("hi", add_special_tokens=False)["input_ids"]
    assert ex.labels == [-100, *ex.input_ids[1:]] and ex.prompt_len == 0
    with pytest.raises(ValueError, match="row 1: the conversation starts with an assistant turn"):
        encode(tok, [conv[1:]], "chat", ["row 1"], [])
