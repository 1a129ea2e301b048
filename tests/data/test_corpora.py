"""Built-in corpora (rotten_tomatoes), causal-LM blocks and the planted datamodule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adarank.data import CausalLMDataModule, PlantedDataModule, TextClassificationDataModule
from adarank.data.rotten_tomatoes import CORPUS_NAME, corpus_path, data_dir, load_rotten_tomatoes
from adarank.models import build_tokenizer

HAVE_CORPUS = (data_dir() / CORPUS_NAME).is_file()


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.skipif(not HAVE_CORPUS, reason="run `make data` first")
def test_rotten_tomatoes_counts_and_split() -> None:
    texts, labels = load_rotten_tomatoes(download=False)
    assert len(texts) == 12_808  # 7,403 fresh + 5,405 rotten, plot rows dropped
    assert labels.count("fresh") == 7_403 and labels.count("rotten") == 5_405
    dm = TextClassificationDataModule(
        "tiny-bert", dataset="rotten_tomatoes", val_size=2000, max_length=16
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (10_808, 2_000)
    assert dm.label_names == ["rotten", "fresh"]
    assert int(dm.train_set.labels.sum()) + int(dm.val_set.labels.sum()) == 7_403


def test_missing_corpus_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="run `make data`"):
        corpus_path(download=False)


def test_causal_lm_blocks_cover_the_text(tmp_path: Path) -> None:
    text = "\n\n".join(f"document {i} says something fairly long" for i in range(40))
    path = tmp_path / "t.txt"
    path.write_text(text)
    dm = CausalLMDataModule(
        "tiny-gpt2", train_file=str(path), block_size=16, val_size=4, batch_size=2
    )
    dm.setup()
    tok = build_tokenizer("tiny-gpt2")
    ids = []
    for doc in text.split("\n\n"):
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_blocks = len(ids) // 16
    assert len(dm.train_set) + len(dm.val_set) == n_blocks and len(dm.val_set) == 4
    expected = torch.tensor(ids[: n_blocks * 16]).view(n_blocks, 16)
    got = torch.cat([dm.train_set.blocks, dm.val_set.blocks])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].shape == (2, 16)


def test_causal_lm_too_little_text(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hi")
    dm = CausalLMDataModule("tiny-gpt2", train_file=str(path), block_size=64)
    with pytest.raises(ValueError, match="block"):
        dm.setup()
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        CausalLMDataModule("tiny-gpt2", train_file=str(path)).setup()


def test_planted_datamodule_serves_the_task() -> None:
    dm = PlantedDataModule(ranks=[2, 1, 0], dims=8, n_train=64, n_val=32, batch_size=16, seed=1)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 24) and y.shape == (16, 24)
    xv, yv = next(iter(dm.val_dataloader()))
    assert torch.equal(xv, dm.planted.x_val[:16])
    from adarank.models import build_planted_model

    assert build_planted_model(dm) is dm.planted.model
