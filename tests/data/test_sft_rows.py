"""SFT rows: file formats, bad data named in errors, truncation policies and their counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sft_helpers import (
    CONVERSATIONS,
    PAIRS,
    datamodule,
    tokenizer_installer,
    write_jsonl,
)

from adarank.data import SFTDataModule
from adarank.data.instructions import SENTIMENT_ANSWERS, SENTIMENT_PROMPT, rotten_tomatoes_rows
from adarank.data.rotten_tomatoes import CORPUS_NAME, LABELS, data_dir, load_rotten_tomatoes
from adarank.data.sft_render import PLAIN_TEMPLATE


@pytest.fixture
def use_tokenizer(monkeypatch: pytest.MonkeyPatch):
    return tokenizer_installer(monkeypatch)


def _write(path: Path, rows: list[dict]) -> Path:
    fmt = path.suffix
    if fmt == ".jsonl":
        return write_jsonl(path, rows)
    if fmt == ".json":
        path.write_text(json.dumps(rows))
    elif fmt == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        pd.DataFrame(rows).to_parquet(path)
    return path


def _encoded(dm) -> list[tuple[list[int], list[int]]]:
    return [(it["input_ids"].tolist(), it["labels"].tolist()) for it in dm.val_set]


@pytest.mark.parametrize("kind", ["pairs", "messages"])
def test_file_formats_give_the_same_examples(tmp_path: Path, use_tokenizer, kind: str) -> None:
    use_tokenizer("chatml")
    rows = PAIRS if kind == "pairs" else [{"messages": c} for c in CONVERSATIONS]
    rows = [{**r, "id": i} for i, r in enumerate(rows)]  # an extra (numeric) column is ignored
    results = {}
    for fmt in ("jsonl", "json", "csv", "parquet"):
        path = _write(tmp_path / f"rows.{fmt}", rows)
        results[fmt] = _encoded(datamodule(path, tmp_path))
    assert len(results["jsonl"]) == len(rows)
    assert results["json"] == results["jsonl"] == results["csv"] == results["parquet"]


def test_csv_numbers_stay_text(tmp_path: Path, use_tokenizer) -> None:
    tok = use_tokenizer("plain")
    path = tmp_path / "n.csv"
    path.write_text("prompt,response\n2 + 2?,4\n3 + 3?,06\n")
    dm = datamodule(path, tmp_path)
    assert [ex["reference"] for ex in dm.generation_examples()] == ["4", "06"]
    labels = dm.val_set[1]["labels"]
    assert tok.decode(labels[labels != -100]) == "06" + tok.eos_token


def _bad(tmp_path: Path, rows, name="bad.jsonl", **kw) -> pytest.ExceptionInfo:
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(ValueError) as err:
        datamodule(path, tmp_path, **kw)
    assert str(path) in str(err.value)
    return err


def test_missing_columns_name_file_row_and_columns(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    err = _bad(tmp_path, [{"question": "q", "answer": "a"}])
    assert "row 1" in str(err.value) and "['question', 'answer']" in str(err.value)
    err = _bad(tmp_path, [{"q": "x", "response": "a"}], data_format="pair", prompt_column="q2")
    assert "no column 'q2'" in str(err.value)
    rows = [{"prompt": "a", "response": "b"}] * 2 + [{"prompt": "c"}]
    assert "row 3: 'response' is missing" in str(_bad(tmp_path, rows).value)


def test_mixed_formats_are_rejected(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    rows = [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[1]}, PAIRS[0]]
    err = _bad(tmp_path, rows)
    assert "mixed row formats: row 1 has 'messages', row 3 has 'prompt'/'response'" in str(
        err.value
    )


def test_bad_messages_are_named(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("chatml")
    bot = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]
    err = _bad(tmp_path, [{"messages": CONVERSATIONS[1]}, {"messages": bot}])
    assert "row 2: messages[1] has role 'bot'" in str(err.value)
    err = _bad(tmp_path, [{"messages": []}])
    assert "row 1: 'messages' must be a non-empty list" in str(err.value)


def test_non_string_values_are_rejected(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    err = _bad(tmp_path, [{"prompt": "a", "response": 1}, {"prompt": "b", "response": 2}])
    assert "row 1: 'response' is int 1; expected a string" in str(err.value)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"template": "jinja"}, r"data.template='jinja': expected one of \['auto', 'chat'"),
        ({"truncation": "cut"}, r"data.truncation='cut': expected one of \['truncate', 'drop'"),
        ({"data_format": "sharegpt"}, r"data.data_format='sharegpt'"),
        ({"max_length": 1}, r"data.max_length=1"),
        ({"dataset": None}, r"set data.train_file or data.dataset"),
    ],
)
def test_bad_options_raise_at_construction(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SFTDataModule("tiny-gpt2", **kw)


def test_unsupported_suffix_and_chat_without_template(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    txt = tmp_path / "rows.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="rows.txt.*unsupported format"):
        datamodule(txt, tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(ValueError, match="data.template='chat' but the tokenizer has no chat"):
        datamodule(path, tmp_path, template="chat")
    # a chat template given in the config makes the chat path available
    dm = datamodule(path, tmp_path, template="chat", chat_template="{{ 'x' }}")
    assert dm.template_used == "chat"


def test_template_that_is_not_prefix_consistent(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("chatml")
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    renamed = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    with pytest.raises(
        ValueError, match="d.jsonl' row 1: the chat template is not prefix-consistent"
    ):
        datamodule(path, tmp_path, chat_template=renamed)
    # text prefixes hold but "<|im" + "_end|>" merges into a special token across the boundary
    merging = (
        "{% for m in messages %}{{ m['role'] + ': <|im' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: <|im' }}{% endif %}"
    )
    rows = [{"prompt": "_start|>", "response": "_end|> yes"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ValueError, match="token ids .* are not a prefix"):
        datamodule(path, tmp_path, chat_template=merging)


def _lengths(tok, prompt: str) -> int:
    text = PLAIN_TEMPLATE["user"].format(content=prompt) + PLAIN_TEMPLATE["generation_prompt"]
    return len(tok(text, add_special_tokens=False)["input_ids"])


ROWS = [
    {"prompt": "a", "response": "yes"},  # fits
    {"prompt": "b", "response": "x" * 50},  # response too long
    {"prompt": "c" * 80, "response": "no"},  # prompt leaves no room
    {"prompt": "d", "response": "ok"},  # fits
]


def test_truncation_policies_and_counts(tmp_path: Path, use_tokenizer) -> None:
    tok = use_tokenizer("plain")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    max_length = _lengths(tok, "b") + 10
    dm = datamodule(path, tmp_path, max_length=max_length)
    r = dm.report
    assert (r["train/rows"], r["train/examples"], r["train/truncated"]) == (4, 3, 1)
    assert (r["train/dropped_no_room"], r["train/dropped_too_long"]) == (1, 0)
    kept = [dm.val_set[i] for i in range(3)]
    assert [len(it["input_ids"]) for it in kept][1] == max_length
    assert int((kept[1]["labels"] != -100).sum()) == 10  # the response tail was cut
    assert r["train/response_tokens"] == 3 + 1 + 10 + 2 + 1
    assert [ex["reference"] for ex in dm.generation_examples()] == ["yes", "x" * 50, "ok"]

    dm = datamodule(path, tmp_path, max_length=max_length, truncation="drop")
    assert (dm.report["train/examples"], dm.report["train/dropped_too_long"]) == (2, 2)
    assert dm.report["train/truncated"] == 0

    with pytest.raises(ValueError, match=r"d.jsonl' row 2: \d+ tokens > data.max_length="):
        datamodule(path, tmp_path, max_length=max_length, truncation="error")

    dm = datamodule(path, tmp_path, max_length=_lengths(tok, "b") + 4, min_response_tokens=4)
    assert dm.report["train/dropped_no_room"] == 1 and dm.report["train/examples"] == 3
    # one token less: "yes"+eos no longer fits and would keep 3 < 4 response tokens
    dm = datamodule(path, tmp_path, max_length=_lengths(tok, "b") + 3, min_response_tokens=4)
    assert (dm.report["train/dropped_no_room"], dm.report["train/examples"]) == (3, 1)


def test_empty_responses_are_counted(tmp_path: Path, use_tokenizer, capsys) -> None:
    use_tokenizer("chatml")
    rows = [{"messages": c} for c in CONVERSATIONS] + [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    dm = datamodule(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path)
    assert dm.report["train/skipped_empty_response"] == 2 and dm.report["train/examples"] == 3
    assert "2 skipped: empty response" in capsys.readouterr().err
    rows = [{"prompt": "a", "response": ""}, {"prompt": "b", "response": ""}]
    with pytest.raises(ValueError, match="no train examples left.*2 skipped: empty response"):
        datamodule(write_jsonl(tmp_path / "e.jsonl", rows), tmp_path)


def test_split_sizes_and_caps(tmp_path: Path, use_tokenizer) -> None:
    use_tokenizer("plain")
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS * 5)
    dm = SFTDataModule(
        "byte",
        train_file=str(path),
        val_size=0.2,
        max_train_examples=7,
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (7, 6)
    dm.setup()  # idempotent
    assert len(dm.train_set) == 7


@pytest.mark.skipif(not (data_dir() / CORPUS_NAME).is_file(), reason="run `make data` first")
def test_builtin_rotten_tomatoes_rows() -> None:
    rows = rotten_tomatoes_rows(download=False)
    texts, labels = load_rotten_tomatoes(download=False)
    assert len(rows) == len(texts) == 12_808 and set(SENTIMENT_ANSWERS) == set(LABELS)
    assert sum(r["response"] == "positive" for r in rows) == labels.count("fresh") == 7_403
    i = labels.index("rotten")
    assert rows[i] == {
        "prompt": SENTIMENT_PROMPT.format(text=texts[i].strip()),
        "response": "negative",
    }
    assert rows[0]["prompt"].startswith(
        "Is the following movie review positive or negative? Answer with one word.\n\nReview: "
    )


def test_hub_dataset_offline_error(use_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    use_tokenizer("plain")
    dm = SFTDataModule("byte", dataset="someone/no_such_dataset")
    with pytest.raises(ValueError, match="no_such_dataset.*not a built-in.*needs a network"):
        dm.setup()
