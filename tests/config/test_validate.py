"""The validator: every shipped recipe passes; each bad input is named with key, value, expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from adarank.config import ConfigError, list_recipes, load_config, validate_config
from adarank.config.instantiate import check_type


@pytest.mark.parametrize("recipe", [name for name, _, _ in list_recipes()])
def test_every_shipped_recipe_validates(recipe: str) -> None:
    validate_config(load_config(recipe))


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("sentence,y\nfine film,pos\nbad film,neg\n")
    return path


def _problems(overrides: list[str], recipe: str = "quickstart") -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(load_config(recipe, overrides))
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("foo.bar=1", r"foo=.*unknown top-level section"),
        ("adapter.bugdet=5", r"adapter.bugdet=5: unknown key; expected one of \[.*'budget'"),
        ("adapter.budget=abc", r"adapter.budget='abc': expected a parameter count"),
        ("adapter.budget=150%", r"adapter.budget='150%'.*percentage"),
        ("adapter.budget=0", r"adapter.budget=0: the budget must be at least 1"),
        ("adapter.init=magic", r"adapter.init='magic': unknown strategy; expected one of \['lora'"),
        ("adapter.init_rank=-1", r"adapter.init_rank=-1: expected an integer ≥ 0"),
        ("adapter.target_modules=[]", r"adapter.target_modules=\[\]: expected at least one"),
        ("seed=abc", r"seed='abc': wrong type str; expected int"),
        ("trainer.max_stepz=3", r"trainer.max_stepz=3: unknown lightning.Trainer argument"),
        ("trainer.max_steps=ten", r"trainer.max_steps='ten': wrong type str; expected int"),
        (
            "trainer.logger=false",
            r"trainer.logger=False: not settable here; use the logger section",
        ),
        ("model.widht=3", r"model.widht=3: unknown argument of adarank.models.build_hf_model"),
        ("model._component_=no.such.fn", r"model._component_='no.such.fn': cannot import module"),
        (
            "model.name_or_path=./missing_dir",
            r"model.name_or_path='./missing_dir': directory not found",
        ),
        ("data.batch_size=big", r"data.batch_size='big': wrong type str; expected int"),
        ("data.train_file=/no/such.csv", r"data.train_file='/no/such.csv': file not found"),
        ("optimizer.lr=-1", r"optimizer.lr=-1: expected a positive number"),
        ("optimizer.name=lion", r"optimizer.name='lion': expected one of \['adamw'"),
        ("schedule.decay=3", r"schedule.decay=3: wrong type int; expected str"),
        ("schedule.interval=x", r"schedule.interval='x': wrong type str"),
        ("allocation.grow=maybe", r"allocation.grow='maybe': wrong type str; expected bool"),
        ("logger.wandb_mode=loud", r"logger.wandb_mode='loud': expected one of"),
        ("callbacks.snapshot_every=3", r"callbacks.snapshot_every=3: unknown key"),
    ],
)
def test_bad_values_are_named(override: str, pattern: str) -> None:
    assert pytest.importorskip("re").search(pattern, _problems([override])), _problems([override])


def test_impossible_schedule() -> None:
    msg = _problems(["trainer.max_steps=10", "schedule.warmup_steps=6", "schedule.final_steps=5"])
    assert "warmup_steps (6) + final_steps (5) must be smaller than total_steps (10)" in msg


def test_budget_needed_when_allocation_on() -> None:
    msg = _problems(["adapter.budget=null"])
    assert "adapter.budget=None" in msg and "allocation.enabled=false" in msg
    validate_config(load_config("quickstart", ["adapter.budget=null", "allocation.enabled=false"]))


def test_missing_column_and_unknown_format(csv_file: Path, tmp_path: Path) -> None:
    msg = _problems([f"data.train_file={csv_file}"])
    assert f"data.train_file='{csv_file}'" in msg and "has no column 'text'" in msg
    validate_config(
        load_config(
            "quickstart",
            [f"data.train_file={csv_file}", "data.text_column=sentence", "data.label_column=y"],
        )
    )
    odd = tmp_path / "d.parquet"
    odd.write_text("x")
    assert "unsupported format" in _problems([f"data.train_file={odd}"])


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(
            load_config("quickstart", ["foo=1", "adapter.init=x", "trainer.max_stepz=1"])
        )
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("3 problems in the config")


def test_budget_forms_accepted() -> None:
    for budget in ("150000", "150k", "1.2M", "0.5%"):
        validate_config(load_config("quickstart", [f"adapter.budget={budget}"]))


@pytest.mark.parametrize(
    ("value", "annotation", "ok"),
    [
        (3, int, True),
        (True, int, False),
        (3, float, True),
        ("3", float, False),
        (None, int | None, True),
        (["a", "b"], list[str], True),
        (["a", 1], list[str], False),
        ("a", str | list[str], True),
        ({"a": 1}, dict, True),
        ([1], dict, False),
    ],
)
def test_check_type(value, annotation, ok: bool) -> None:
    assert check_type(value, annotation) is ok


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.scaling=abc", "adapter.scaling='abc': wrong type str; expected float"),
        ("optimizer.max_skipped_steps=2.5", "optimizer.max_skipped_steps=2.5: wrong type float"),
        ("logger.csv=maybe", "logger.csv='maybe': wrong type str; expected bool"),
        ("callbacks.extra={a: 1}", "callbacks.extra={'a': 1}: wrong type dict; expected list"),
        ("adapter.budget=[1]", "adapter.budget=[1]: wrong type list; expected int | str | None"),
    ],
)
def test_structured_schema_rejects_a_wrong_type(override: str, message: str) -> None:
    """The OmegaConf merge onto the dataclasses rejects it, naming the key, value and type."""
    from adarank.config.structured import structured_problems

    cfg = load_config("planted", [override])
    assert any(p.startswith(message) for p in structured_problems(cfg)), structured_problems(cfg)
    assert message in _problems([override], "planted")


def test_typed_config_has_every_default_and_the_field_types() -> None:
    from adarank.allocation.budget import SCHEDULE_DEFAULTS
    from adarank.config.structured import section_defaults, typed

    plain = typed({"adapter": {"scaling": 2, "budget": "1k"}, "seed": 3})
    assert plain["adapter"]["scaling"] == 2.0 and isinstance(plain["adapter"]["scaling"], float)
    assert plain["adapter"]["budget"] == "1k" and plain["seed"] == 3
    assert plain["schedule"] == section_defaults("schedule")
    assert {k: plain["schedule"][k] for k in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS
    with pytest.raises(ConfigError, match=r"optimizer.lr='fast': wrong type str; expected float"):
        typed({"optimizer": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"adapter.bugdet=5: unknown key; expected one of"):
        typed({"adapter": {"bugdet": 5}})


def test_load_config_fills_the_schema_defaults(tmp_path: Path) -> None:
    from adarank.config.structured import section_defaults

    recipe = tmp_path / "bare.yaml"
    recipe.write_text(
        "defaults: [model/planted, data/planted, trainer/cpu]\n"
        "adapter: {target_modules: ['re:blocks\\.\\d+'], budget: 6192}\n"
        "schedule: {interval: 25}\n"
    )
    cfg = load_config(recipe)
    assert cfg.seed == 0 and cfg.data.seed == 0  # ${seed} resolves to the default
    assert cfg.schedule.interval == 25  # the recipe's value wins
    for section in ("adapter", "allocation", "optimizer", "logger", "callbacks"):
        defaults = section_defaults(section)
        given = {"adapter": {"target_modules", "budget"}}.get(section, set())
        assert {k: v for k, v in cfg[section].items() if k not in given} == {
            k: v for k, v in defaults.items() if k not in given
        }, section
    validate_config(cfg)


def test_cli_exits_2_naming_the_key(capsys: pytest.CaptureFixture) -> None:
    from adarank.cli import main

    assert main(["validate", "planted", "schedule.warmup_frac=most"]) == 2
    assert "schedule.warmup_frac='most': wrong type str; expected float" in capsys.readouterr().err
