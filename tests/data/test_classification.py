"""Text-classification data: file formats, labels, splits, bad data, tokenisation cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adarank.data import TextClassificationDataModule, read_columns
from adarank.data.classification import collate_trim, label_mapping, split_indices
from adarank.data.tokenized import cache_dir, tokenize_texts
from adarank.models import build_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))


def _write(path: Path, rows: list[tuple[str, object]], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows))
    return path


ROWS = [(f"review number {i}", "pos" if i % 3 else "neg") for i in range(30)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_formats_read_the_same(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / f"d.{fmt}", ROWS, fmt)
    cols = read_columns(path, ["text", "label"])
    assert cols["text"] == [t for t, _ in ROWS]
    assert cols["label"] == [y for _, y in ROWS]


def test_label_mapping_numeric_and_strings() -> None:
    assert label_mapping(["10", "2", "1"]) == ["1", "2", "10"]
    assert label_mapping([1, 0, 2]) == ["0", "1", "2"]
    assert label_mapping(["pos", "neg"]) == ["neg", "pos"]


def test_split_is_seeded_disjoint_and_sized() -> None:
    tr, va = split_indices(100, 0.2, seed=1)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert sorted(tr + va) == list(range(100))
    assert split_indices(100, 20, seed=1) == (tr, va)
    assert split_indices(100, 20, seed=2) != (tr, va)
    with pytest.raises(ValueError, match="val_size=100 gives 100 validation examples out of 100"):
        split_indices(100, 100, seed=0)


def test_datamodule_batches_and_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", ROWS, "csv")
    dm = TextClassificationDataModule("tiny-bert", train_file=str(path), val_size=6, batch_size=4)
    dm.setup()
    assert dm.label_names == ["neg", "pos"] and dm.num_labels == 2
    assert len(dm.train_set) == 24 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())  # trimmed
    # labels follow the mapping: decode each validation text back to its row
    tok = build_tokenizer("tiny-bert")
    truth = dict(ROWS)
    for item in dm.val_set:
        text = tok.decode(
            item["input_ids"][item["attention_mask"].bool()], skip_special_tokens=True
        )
        assert dm.label_names[int(item["labels"])] == truth[text]
    out = tmp_path / "labels.json"
    dm.save_labels(out)
    assert json.loads(out.read_text())["label2id"] == {"neg": 0, "pos": 1}


def test_val_file_and_unseen_label(tmp_path: Path) -> None:
    train = _write(tmp_path / "t.jsonl", ROWS, "jsonl")
    val = _write(tmp_path / "v.jsonl", [("x y", "pos"), ("z", "neg")], "jsonl")
    dm = TextClassificationDataModule("tiny-bert", train_file=str(train), val_file=str(val))
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.val_set) == 2
    bad = _write(tmp_path / "b.jsonl", [("x", "meh")], "jsonl")
    dm = TextClassificationDataModule("tiny-bert", train_file=str(train), val_file=str(bad))
    with pytest.raises(ValueError, match=r"labels \['meh'\] not in the training labels"):
        dm.setup()


@pytest.mark.parametrize(
    ("rows", "kwargs", "error", "pattern"),
    [
        ([("a", "x"), ("b", "x")], {}, ValueError, r"only one class \('x'\)"),
        ([("a", "x"), ("  ", "y")], {}, ValueError, r"example 1 has an empty text"),
        ([("a", "x"), ("b", "")], {}, ValueError, r"example 1 has an empty label"),
        (ROWS, {"label_column": "stars"}, ValueError, r"has no column 'stars'; columns: \['text'"),
    ],
)
def test_bad_data_errors(tmp_path: Path, rows, kwargs, error, pattern) -> None:
    path = _write(tmp_path / "d.csv", rows, "csv")
    dm = TextClassificationDataModule("tiny-bert", train_file=str(path), val_size=1, **kwargs)
    with pytest.raises(error, match=pattern):
        dm.setup()


def test_missing_file_error(tmp_path: Path) -> None:
    dm = TextClassificationDataModule("tiny-bert", train_file=str(tmp_path / "none.csv"))
    with pytest.raises(FileNotFoundError, match="none.csv' does not exist"):
        dm.setup()


def test_tokenisation_cache_roundtrip(tmp_path: Path) -> None:
    tok = build_tokenizer("tiny-bert")
    texts = ["hello there", "general kenobi"]
    first = tokenize_texts(tok, texts, 16)
    files = list(cache_dir().glob("*.pt"))
    assert len(files) == 1
    cached = torch.load(files[0], weights_only=True)
    assert torch.equal(cached["input_ids"], first["input_ids"])
    again = tokenize_texts(tok, texts, 16)
    assert torch.equal(again["input_ids"], first["input_ids"])
    tokenize_texts(tok, texts, 8)  # a different max length is a different entry
    assert len(list(cache_dir().glob("*.pt"))) == 2
    direct = tok(texts, max_length=16, truncation=True, padding="max_length")["input_ids"]
    assert first["input_ids"].tolist() == direct


def test_collate_trim_keeps_content() -> None:
    items = [
        {
            "input_ids": torch.tensor([5, 6, 0, 0]),
            "attention_mask": torch.tensor([1, 1, 0, 0]),
            "labels": torch.tensor(1),
        },
        {
            "input_ids": torch.tensor([7, 0, 0, 0]),
            "attention_mask": torch.tensor([1, 0, 0, 0]),
            "labels": torch.tensor(0),
        },
    ]
    batch = collate_trim(items)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert batch["labels"].tolist() == [1, 0]
