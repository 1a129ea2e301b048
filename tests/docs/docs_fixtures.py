"""Set-ups for the python blocks of the docs that use objects they do not define.

A block names its set-up with ``<!-- docs-test: fixture=NAME -->``. Each :class:`Fixture`
builds the missing objects from tiny random-init models in the test's temporary working
directory, may replace a few exact strings of the block (``substitutions``: e.g. a 600-step run
becomes 3 steps; every original string must still be in the block, so a docs edit that removes
it fails loudly), and may check what the block produced (``check``). Nothing reads the network:
Hub loaders are replaced by tiny local stand-ins (see :mod:`docs_fixtures_hf`), which accept
only the model and dataset ids the docs name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from docs_fixtures_hf import HF_FIXTURES

__all__ = ["FIXTURES", "Fixture", "Context", "classification_examples", "tiny_bert"]

VOCAB = 261  # adarank's byte-level tokenizer of the tiny built-ins: 5 specials + 256 bytes


@dataclass
class Context:
    """What a set-up may use: the block's working directory and pytest's monkeypatch."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Fixture:
    setup: Callable[[Context], dict]
    check: Callable[[dict], None] | None = None
    substitutions: dict[str, str] = field(default_factory=dict)


def classification_examples(n: int, seq: int = 12, seed: int = 0) -> list[dict]:
    """``n`` token sequences labelled by whether their first token is in the upper half."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq), generator=g)
    labels = (ids[:, 0] > (VOCAB + 5) // 2).long()
    mask = torch.ones(seq, dtype=torch.long)
    return [{"input_ids": x, "attention_mask": mask, "labels": y} for x, y in zip(ids, labels)]


def loader(n_batches: int, batch: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        classification_examples(n_batches * batch, seed=seed), batch_size=batch
    )


def tiny_bert(seed: int = 0, hidden: int = 32, intermediate: int | None = None):
    """A random-init ``BertForSequenceClassification`` (2 layers, 2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


# ----------------------------------------------------------------------------- README
def _bert_loop(ctx: Context) -> dict:
    # hidden 128: big enough that the README's 150k budget (b_0 = 225k) fits at max_rank
    return {"model": tiny_bert(hidden=128), "loader": loader(40)}


def _check_bert_loop(ns: dict) -> None:
    history = ns["controller"].history
    assert history, "the plain loop never re-allocated"
    assert sum(e.n_grown + e.n_pruned for e in history) > 0
    assert Path("adapter/adapter_config.json").is_file()


# ----------------------------------------------------------------------------- analysis
def _write_run(run_dir: Path, seed: int) -> None:
    """A small finished run: adapters on a tiny BERT trained under a budget by the controller."""
    from adarank import add_adapters, save_adapter
    from adarank.allocation import BudgetSchedule, RankController
    from adarank.lightning.trajectory_io import event_record, write_budget_csv, write_ranks_csv

    model = tiny_bert(seed=0)
    layers = add_adapters(
        model, ["query", "value"], init_rank=4, scaling=16.0, modules_to_save=["classifier"],
        seed=seed,
    )  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    schedule = BudgetSchedule(final_budget=600, total_steps=24, interval=4)
    controller = RankController(layers, schedule, optimizer=opt, seed=seed)
    for step, batch in enumerate(loader(24, seed=seed), start=1):
        model(**batch).loss.backward()
        controller.observe()
        opt.step()
        if controller.step(step) is not None:
            save_adapter(model, run_dir / "snapshots" / f"step_{step:07d}")
        opt.zero_grad()
    history = [event_record(e) for e in controller.history]
    write_ranks_csv(run_dir / "ranks.csv", history)
    write_budget_csv(run_dir / "budget.csv", history)
    save_adapter(model, run_dir / "adapter")


def _two_runs(ctx: Context) -> dict:
    _write_run(ctx.tmp / "runs" / "quickstart", seed=0)
    _write_run(ctx.tmp / "runs" / "quickstart-seed1", seed=1)
    return {"my_base_model": tiny_bert(seed=0)}


def _check_two_runs(ns: dict) -> None:
    modules = ns["result"].data["delta_vs_w"]["modules"]
    assert modules and all(row["amplification"] is not None for row in modules.values())
    assert Path("runs/quickstart/analysis/report.md").is_file()


# ----------------------------------------------------------------------------- export
def _peft_lora(ctx: Context) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    peft_model = get_peft_model(tiny_bert(seed=0), config)
    peft_model.save_pretrained(ctx.tmp / "path" / "to" / "peft_lora")
    return {"base_model": tiny_bert(seed=0)}


def _check_peft_lora(ns: dict) -> None:
    assert len(ns["layers"]) == 4  # query and value of 2 layers


def _llama_adapters(ctx: Context) -> dict:
    import copy

    from adarank import add_adapters, save_adapter
    from adarank.models import build_hf_model

    base = build_hf_model("tiny-llama", task="causal_lm", seed=0)
    for seed, name in enumerate(("sst2", "imdb")):
        tuned = copy.deepcopy(base)
        layers = add_adapters(tuned, ["q_proj", "v_proj"], init_rank=2 + seed, seed=seed)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_lambda.normal_(0.0, 0.1)
        save_adapter(tuned, ctx.tmp / "runs" / name / "adapter")
    g = torch.Generator().manual_seed(0)
    return {
        "base_model": base,
        "batch": {"input_ids": torch.randint(5, VOCAB, (4, 8), generator=g)},
        "prompt": torch.randint(5, VOCAB, (2, 5), generator=g),
    }


def _check_llama_adapters(ns: dict) -> None:
    assert ns["out"].logits.shape[0] == 4
    assert ns["tokens"].shape == (2, 5 + 20)


# ----------------------------------------------------------------------------- init, lightning
def _init_bert(ctx: Context) -> dict:
    return {"model": tiny_bert(), "train_loader": loader(32)}


def _check_init_bert(ns: dict) -> None:
    assert ns["report"].ranks and all(r == 8 for r in ns["report"].ranks.values())


def _lightning_bert(ctx: Context) -> dict:
    path = ctx.tmp / "tiny-bert"
    tiny_bert().save_pretrained(path)
    return {"path": str(path), "train_loader": loader(12), "val_loader": loader(2, seed=1)}


def _check_lightning_bert(ns: dict) -> None:
    assert ns["trainer"].global_step == 12
    assert ns["module"].controller.history, "no allocation happened"
    assert Path("runs/sst/ranks.csv").is_file()
    assert Path("runs/sst/checkpoints/last.ckpt").is_file()


FIXTURES: dict[str, Fixture] = {
    "bert_loop": Fixture(_bert_loop, _check_bert_loop),
    "two_runs": Fixture(_two_runs, _check_two_runs),
    "peft_lora": Fixture(_peft_lora, _check_peft_lora),
    "llama_adapters": Fixture(_llama_adapters, _check_llama_adapters),
    "init_bert": Fixture(_init_bert, _check_init_bert),
    "lightning_bert": Fixture(_lightning_bert, _check_lightning_bert),
    **{name: Fixture(*parts) for name, parts in HF_FIXTURES.items()},
}
