"""Every fenced code block of README.md and docs/*.md runs or is checked (see docs_blocks.py).

* python — executed in a fresh namespace, in a temporary working directory, offline
  (``WANDB_MODE=disabled``, HF offline), after the set-up its ``fixture=`` directive names
  (docs_fixtures.py: tiny random-init models), followed by that set-up's check;
* shell — every command checked (docs_shell.py): CLI parse, recipe validation as
  ``adarank fit --print-config`` does it, script argument parsers, Makefile targets, pip extras;
* yaml — parsed; a recipe (``defaults:``) is written to a file and loaded, a fragment is merged
  onto ``quickstart`` (or the ``recipe=`` directive's recipe); then :func:`validate_config`;
* json — parsed (JSON Lines allowed);
* text (diagrams, listings, output) and ``skip`` directives — reported as skipped.

``test_checks_can_fail`` shows that each kind of check rejects a broken block.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from docs_blocks import Block, parse_blocks, read_blocks
from docs_fixtures import FIXTURES, Context
from docs_shell import check_shell_block

BLOCKS = read_blocks()
_NAMESPACES: dict[str, tuple[int, dict, Path]] = {}  # file → (line, namespace, cwd) of the last run


def _previous_python(block: Block) -> Block:
    before = [
        b for b in BLOCKS if b.file == block.file and b.kind == "python" and b.line < block.line
    ]
    assert before, f"{block.id}: 'continues' but no python block before it in {block.file}"
    return before[-1]


@pytest.fixture
def docs_env(monkeypatch, tmp_path):
    for key, value in {
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    yield Context(tmp_path, monkeypatch)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # a block's (disabled) run must not leak into the next block


def run_python(block: Block, ctx: Context) -> dict:
    """Execute ``block`` (after its fixture, or in its predecessor's namespace); return it."""
    namespace: dict = {"__name__": "__docs__"}
    fixture = FIXTURES.get(block.fixture) if block.fixture else None
    if block.fixture and fixture is None:
        raise AssertionError(f"{block.id}: unknown fixture {block.fixture!r}; see docs_fixtures.py")
    if block.continues:
        prev = _previous_python(block)
        cached = _NAMESPACES.get(block.file)
        if cached is None or cached[0] != prev.line:
            run_python(prev, ctx)
            cached = _NAMESPACES[block.file]
        namespace, cwd = cached[1], cached[2]
        ctx.monkeypatch.chdir(cwd)
    text = block.text
    if fixture is not None:
        namespace.update(fixture.setup(ctx))
        for old, new in fixture.substitutions.items():
            assert old in text, f"{block.id}: fixture {block.fixture} expects {old!r} in the block"
            text = text.replace(old, new)
    exec(compile(text, block.id, "exec"), namespace)  # noqa: S102 - the docs' own examples
    if fixture is not None and fixture.check is not None:
        fixture.check(namespace)
    _NAMESPACES[block.file] = (block.line, namespace, Path.cwd())
    return namespace


def check_yaml(block: Block, ctx: Context) -> None:
    from omegaconf import OmegaConf

    from adarank.config import load_config, validate_config

    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.id}: expected a mapping, got {type(data).__name__}"
    if "defaults" in data:
        path = ctx.tmp / "docs_recipe.yaml"
        path.write_text(block.text)
        cfg = load_config(path)
    else:
        cfg = OmegaConf.merge(load_config(block.recipe or "quickstart"), OmegaConf.create(data))
    validate_config(cfg)


def check_json(block: Block) -> None:
    try:
        json.loads(block.text)
    except json.JSONDecodeError:
        for n, line in enumerate(block.text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise AssertionError(f"{block.id}: line {n} is not JSON: {err}") from None


def shell_placeholders(ctx: Context) -> dict[str, str]:
    """Files the docs' commands name as examples, created in the working directory."""
    rows = [{"prompt": "Capital of France?", "response": "Paris"}] * 4
    for name in ("my.jsonl", "val.jsonl"):
        (ctx.tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ctx.tmp / "hf-model").mkdir(exist_ok=True)
    return {"/path/to/hf-model": str(ctx.tmp / "hf-model")}


def check_block(block: Block, ctx: Context) -> None:
    if block.kind == "python":
        run_python(block, ctx)
    elif block.kind == "shell":
        check_shell_block(block.text, shell_placeholders(ctx), plain=block.lang == "")
    elif block.kind == "yaml":
        check_yaml(block, ctx)
    elif block.kind == "json":
        check_json(block)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block(block: Block, docs_env: Context) -> None:
    if block.skip:
        pytest.skip(f"docs-test skip: {block.skip}")
    if block.kind in ("text", "other"):
        pytest.skip(f"not code ({block.lang or 'plain'} block: diagram, listing or output)")
    check_block(block, docs_env)


def test_blocks_found() -> None:
    kinds = {b.kind for b in BLOCKS}
    assert {"python", "shell", "yaml", "json"} <= kinds
    assert all(b.fixture in FIXTURES for b in BLOCKS if b.fixture), "unknown fixture names"


BROKEN = {
    "python": "```python\nimport adarank\nadarank.no_such_function()\n```\n",
    "fixture": "<!-- docs-test: fixture=bert_loop -->\n```python\nmodel.no_such_method()\n```\n",
    "cli": "```bash\nadarank fit quickstart --no-such-flag\n```\n",
    "recipe": "```bash\nadarank fit quickstart adapter.no_such_key=1\n```\n",
    "script": "```bash\npython scripts/bench_planted.py --no-such-option 3\n```\n",
    "make": "```bash\nmake run RECIPE=no_such_recipe\n```\n",
    "synopsis": "```\nadarank export RUN_DIR --no-such-flag DIR\n```\n",
    "yaml": "```yaml\nallocation: {scorer: no_such_scorer, grow: maybe}\n```\n",
    "json": '```json\n{"messages": [}\n```\n',
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_checks_can_fail(what: str, docs_env: Context) -> None:
    (block,) = parse_blocks(BROKEN[what], "broken.md")
    with pytest.raises(Exception):  # noqa: B017, PT011 - any failure of the check will do
        check_block(block, docs_env)
