"""Instantiation and wiring: builders, injection, AdaRankModule arguments, feasibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adarank.config import ConfigError, instantiate, load_config
from adarank.config.build import (
    add_config_adapters,
    build_model,
    check_feasible,
    estimate_total_steps,
    module_kwargs,
)
from adarank.models import build_hf_model, build_tokenizer


def test_instantiate_injects_only_missing_accepted_args() -> None:
    node = {
        "_component_": "adarank.models.build_hf_model",
        "name_or_path": "tiny-bert",
        "num_labels": 3,
    }
    model = instantiate(node, "model", num_labels=5, data=object())  # config wins; data ignored
    assert model.config.num_labels == 3
    with pytest.raises(ConfigError, match="model._component_='nope': expected a dotted"):
        instantiate({"_component_": "nope"}, "model")


def test_tiny_models_are_reproducible_and_offline() -> None:
    a, b = build_hf_model("tiny-bert", seed=4), build_hf_model("tiny-bert", seed=4)
    c = build_hf_model("tiny-bert", seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    gpt = build_hf_model("tiny-gpt2", task="causal_lm")
    tok = build_tokenizer("tiny-gpt2")
    enc = tok(["héllo"], return_tensors="pt")
    assert gpt(**enc).logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == "héllo"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"task": "ner"}, r"model.task='ner': expected one of"),
        ({"num_labels": 1}, r"model.num_labels=1: expected an integer ≥ 2"),
        ({"dtype": "int8"}, r"model.dtype='int8'"),
        ({"name_or_path": "./no/such/dir"}, r"no such model directory"),
    ],
)
def test_model_builder_errors(kwargs: dict, pattern: str) -> None:
    args = {"name_or_path": "tiny-bert", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        build_hf_model(**args)


class _FakeData:
    task_type = "causal_lm"


def test_head_and_data_task_must_agree() -> None:
    cfg = load_config("quickstart", ["model.name_or_path=tiny-bert"])
    with pytest.raises(ConfigError, match="classification head but data .* causal_lm batches"):
        build_model(cfg, _FakeData())


def test_module_kwargs_mapping() -> None:
    cfg = load_config(
        "quickstart",
        [
            "optimizer.name=sgd",
            "schedule.interval=7",
            "allocation.scorer=magnitude",
            "allocation.retract=true",
            "adapter.budget=0.5%",
        ],
    )
    kw = module_kwargs(cfg)
    assert kw["optimizer"] == "sgd" and kw["interval"] == 7 and kw["scorer"] == "magnitude"
    assert kw["retract"] is True
    assert kw["budget"] == "0.5%"
    off = module_kwargs(load_config("lora_baseline"))
    assert off["budget"] is None and "enabled" not in off


def test_budget_above_capacity_is_rejected(tmp_path: Path) -> None:
    from adarank.lightning import AdaRankModule

    cfg = load_config(
        "quickstart",
        [
            "model.name_or_path=tiny-bert",
            "adapter.target_modules=[query]",
            "adapter.max_rank=2",
            "adapter.budget=1000",
            "schedule.warmup_steps=5",
        ],
    )
    model = build_hf_model("tiny-bert")
    add_config_adapters(cfg, model)
    module = AdaRankModule(model, "classification", budget=1000, max_rank=2)
    # 2 query layers × max_rank 2 × (32 + 32 + 1) = 260 params of capacity
    with pytest.raises(ConfigError, match="1000 params exceeds the 260 params"):
        check_feasible(cfg, module, 100)
    # the warm-up budget (1.5 × final) must fit too: 1.5 × 200 = 300 > 260
    module = AdaRankModule(model, "classification", budget=200, max_rank=2)
    with pytest.raises(ConfigError, match="initial budget 300 params is above the 260"):
        check_feasible(cfg, module, 100)
    module = AdaRankModule(model, "classification", budget=170, max_rank=2)
    check_feasible(cfg, module, 100)
    with pytest.raises(ConfigError, match="cannot hold one triplet: .* costs 65 params"):
        check_feasible(cfg, AdaRankModule(model, "classification", budget=64, max_rank=2), 100)
    with pytest.raises(ConfigError, match="the trainer would take 0 optimizer steps"):
        check_feasible(cfg, module, 0)
    with pytest.raises(ConfigError, match=r"schedule with 6 optimizer steps.*warmup_steps \(5\)"):
        check_feasible(cfg, module, 6)


def test_estimate_total_steps() -> None:
    class D:
        def train_dataloader(self):
            return range(10)

    def est(*overrides: str) -> int | None:
        return estimate_total_steps(load_config("quickstart", list(overrides)), D())

    assert est("trainer.max_epochs=2") == 20
    assert est("trainer.max_epochs=2", "trainer.accumulate_grad_batches=3") == 8
    assert est("trainer.max_epochs=-1", "trainer.max_steps=7") == 7
    assert est("trainer.max_epochs=1", "trainer.max_steps=70") == 10
    assert est("trainer.max_epochs=1", "trainer.limit_train_batches=0.5") == 5


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    ("strategy", "devices", "processes"),
    [("ddp", 2, 2), ("sharded_base", 3, 3), ("ddp", "[0,1]", 2), ("auto", 2, 1), ("ddp", 1, 1)],
)
def test_estimate_total_steps_counts_one_process_share(
    strategy: str, devices: int | str, processes: int, drop_last: bool
) -> None:
    """Under data parallelism each process sees its shard: the count equals the length of a
    DataLoader over torch's DistributedSampler (computed by torch, not by the estimate)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    dataset = list(range(101))

    class D:
        def train_dataloader(self):
            return DataLoader(dataset, batch_size=8, drop_last=drop_last)

    sampler = DistributedSampler(dataset, num_replicas=processes, rank=0, shuffle=False)
    expected = len(DataLoader(dataset, batch_size=8, sampler=sampler, drop_last=drop_last))
    cfg = load_config(
        "quickstart",
        [f"trainer.strategy={strategy}", f"trainer.devices={devices}", "trainer.max_epochs=2"],
    )
    assert estimate_total_steps(cfg, D()) == 2 * expected


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # b_T = 1001, T = 101: b_0 = round(1501.5) = 1502, t_w = round(10.1), t_f = round(20.2)
        ({}, {"init_budget": 1502, "warmup_steps": 10, "final_steps": 20, "interval": 10}),
        (
            {"init_budget_ratio": 1.0, "warmup_frac": 0.25, "final_steps": 7, "interval": 3},
            {"init_budget": 1001, "warmup_steps": 25, "final_steps": 7, "interval": 3},
        ),
        (
            {"warmup_steps": 5, "final_frac": 0.3, "decay": "linear", "total_steps": 50},
            {"init_budget": 1502, "warmup_steps": 5, "final_steps": 15, "total_steps": 50},
        ),
    ],
)
def test_validator_and_module_build_the_same_schedule(schedule: dict, expected: dict) -> None:
    """One constructor (BudgetSchedule.from_fractions) behind validate and AdaRankModule."""
    from adarank.config.schema import MODULE_ARGS
    from adarank.config.validate import schedule_for
    from adarank.lightning import AdaRankModule

    model = build_hf_model("tiny-bert")
    add_config_adapters(load_config("quickstart", ["model.name_or_path=tiny-bert"]), model)
    args = {MODULE_ARGS["schedule"][k]: v for k, v in schedule.items()}
    module = AdaRankModule(model, "classification", budget=1001, **args)
    total = schedule.get("total_steps", 101)
    built, checked = module._build_schedule(total), schedule_for(1001, 101, schedule)
    assert built == checked
    assert {k: getattr(built, k) for k in expected} == expected
