"""A corpus of bad adapter files: every one is refused before anything changes.

Each case corrupts a copy of a valid adapter directory (a tiny BERT with adapters on query and
value, a data-aware-init shift on one layer and the classifier in ``modules_to_save``) and
asserts that ``load_adapter`` raises ``ValueError`` (``FileNotFoundError`` for a missing file)
with a message naming the file and the key or tensor at fault, that the model it was loaded into
is unchanged and that no file was created or changed. The cases marked ``cli`` also go through
``adarank export RUN --format merged --out D`` on a finished run (trained with a data-aware
init): exit code 2, the culprit on stderr, no ``D`` and the run directory unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adarank.cli import main
from adarank.modules import adapter_layers, add_adapters, load_adapter, save_adapter

Q0 = "bert.encoder.layer.0.attention.self.query"
V0 = "bert.encoder.layer.0.attention.self.value"
V1 = "bert.encoder.layer.1.attention.self.value"
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


# ------------------------------------------------------------------ corruptions
def _bytes(fn: Callable[[bytes], bytes], name: str = WEIGHTS) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        (d / name).write_bytes(fn((d / name).read_bytes()))

    return corrupt


def _tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        fn(tensors)
        save_file(tensors, d / WEIGHTS)

    return corrupt


def _config(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        new = fn(config)
        (d / CONFIG).write_text(json.dumps(config if new is None else new))

    return corrupt


def _set(key: str, value: torch.Tensor | Callable) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = value(t[key]) if callable(value) else value

    return edit


def _poison(key: str, index, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = t[key].clone()
        t[key][index] = value

    return edit


def _layer(name: str, key: str, value) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        if value is _DROP:
            del c["layers"][name][key]
        else:
            c["layers"][name][key] = value

    return edit


def _rename_layer(old: str, new: str) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        _config(lambda c: c["layers"].update({new: c["layers"].pop(old)}))(d)
        _tensors(lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t) if old in k}))(
            d
        )

    return corrupt


def _drop(key: str) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        del c[key]

    return edit


def _fingerprint_probes(c: dict) -> None:
    c["base_fingerprint"]["layers"][Q0]["probes"] = ["x"] * 4


_DROP = object()


@dataclass(frozen=True)
class Case:
    """One bad adapter: ``corrupt(dir)``, the expected error and message."""

    id: str
    corrupt: Callable[[Path], None] | None
    match: str  # regex searched in the message
    error: type[Exception] = ValueError
    other_base: bool = False  # load into (or rebuild the run with) other base weights


CASES = [
    Case("truncated", _bytes(lambda b: b[: len(b) // 2]), r"adapter\.safetensors.*truncated"),
    Case("random_bytes", _bytes(lambda b: random.Random(0).randbytes(len(b))), r"adapter\.safetensors.*corrupt"),
    Case("empty_weights", _bytes(lambda b: b""), r"adapter\.safetensors.*truncated or corrupt"),
    Case("missing_weights", lambda d: (d / WEIGHTS).unlink(), r"adapter\.safetensors is missing", FileNotFoundError),
    Case("nan_lambda", _tensors(_poison(f"{Q0}.lora_lambda", 1, float("nan"))), rf"tensor {Q0}\.lora_lambda in .*adapter\.safetensors has 1 non-finite"),
    Case("inf_shift", _tensors(_poison(f"{V0}.shift_P", (0, 0), float("inf"))), rf"tensor {V0}\.shift_P .* non-finite"),
    Case("nan_saved_module", _tensors(_poison("classifier.bias", 0, float("nan"))), r"tensor classifier\.bias .* non-finite"),
    Case("integer_tensor", _tensors(_set(f"{Q0}.lora_Q", lambda t: t.long())), rf"tensor {Q0}\.lora_Q .* dtype torch\.int64"),
    Case("wrong_shape", _tensors(_set(f"{Q0}.lora_P", torch.zeros(32, 4))), rf"tensor {Q0}\.lora_P .* shape \(32, 4\), expected \(32, 3\)"),
    Case("missing_tensor", _tensors(lambda t: t.pop(f"{V1}.lora_Q")), rf"lacks tensor {V1}\.lora_Q"),
    Case("missing_shift", _tensors(lambda t: t.pop(f"{V0}.shift_Q")), rf"lacks tensor {V0}\.shift_Q"),
    Case("extra_tensor", _tensors(_set("bert.pooler.dense.lora_P", torch.zeros(32, 1))), r"tensor\(s\) \['bert\.pooler\.dense\.lora_P'\] that the adapter config does not describe"),
    Case("config_truncated", _bytes(lambda b: b[:40], CONFIG), r"adapter_config\.json is not valid JSON"),
    Case("config_random_bytes", _bytes(lambda b: bytes(range(128, 256)), CONFIG), r"adapter_config\.json is not valid JSON"),
    Case("config_not_object", _config(lambda c: [c]), r"adapter_config\.json holds a JSON list, not an object"),
    Case("no_layers_key", _config(_drop("layers")), r"adapter_config\.json lacks the key 'layers'"),
    Case("layers_empty", _config(lambda c: c.update(layers={})), r"key 'layers' must be a non-empty object"),
    Case("layer_without_rank", _config(_layer(Q0, "rank", _DROP)), rf"key 'layers'\.'{Q0}' lacks 'rank'"),
    Case("rank_not_int", _config(_layer(Q0, "rank", "3")), rf"'layers'\.'{Q0}'\.'rank' must be an integer ≥ 0, got '3'"),
    Case("rank_too_large", _config(_layer(Q0, "rank", 33)), rf"'{Q0}': rank 33 exceeds min\(d_in, d_out\) = 32"),
    Case("bad_scaling", _config(_layer(Q0, "scaling", -1.0)), rf"'{Q0}'\.'scaling' must be a positive finite number"),
    Case("rank_disagrees", _config(_layer(Q0, "rank", 2)), rf"tensor {Q0}\.lora_P .* shape \(32, 3\), expected \(32, 2\)"),
    Case("shift_rank_disagrees", _config(_layer(V0, "shift_rank", 1)), rf"tensor {V0}\.shift_P .* shape \(32, 2\), expected \(32, 1\)"),
    Case("wrong_version", _config(lambda c: c.update(format_version=2)), r"adapter_config\.json: unknown adapter format_version 2"),
    Case("foreign_format", _config(lambda c: {"peft_type": "LORA", "r": 8}), r"adapter_config\.json is not an adarank adapter config"),
    Case("layer_not_in_model", _rename_layer(Q0, "bert.encoder.layer.7.attention.self.query"), r"no module\(s\) \['bert\.encoder\.layer\.7\.attention\.self\.query'\] named in \S+adapter_config\.json"),
    Case("saved_module_not_in_model", _config(lambda c: c.update(modules_to_save=["head"])), r"saved module 'head' named in the adapter config next to \S+adapter\.safetensors does not exist"),
    Case("saved_module_tensor_missing", _tensors(lambda t: t.pop("classifier.weight")), r"lacks saved-module tensor classifier\.weight"),
    Case("saved_module_shape", _tensors(_set("classifier.weight", torch.zeros(3, 32))), r"saved module parameter 'classifier\.weight'.*\(2, 32\), file \(3, 32\) in \S+adapter\.safetensors"),
    Case("modules_to_save_not_list", _config(lambda c: c.update(modules_to_save="classifier")), r"key 'modules_to_save' must be a list of strings"),
    Case("fingerprint_malformed", _config(_fingerprint_probes), rf"'base_fingerprint'\.'layers'\.'{Q0}' is malformed"),
    Case("different_base_weights", None, r"other base weights: 4 of 4 adapted layer.*check_base=False", other_base=True),
]  # fmt: skip


# ------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _adapted(make_tiny_bert) -> torch.nn.Module:
    model = make_tiny_bert(0)
    layers = add_adapters(model, ["query", "value"], 3, modules_to_save="classifier", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g))
        w = layers[V0].base_layer.weight.detach()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        layers[V0].shift_base(U[:, :2] * S[:2], Vh[:2])  # PiSSA-like init
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g))
    return model


@pytest.fixture
def good_adapter(make_tiny_bert, tmp_path) -> Path:
    directory = save_adapter(_adapted(make_tiny_bert), tmp_path / "adapter")
    load_adapter(make_tiny_bert(0), directory)  # the uncorrupted file loads
    return directory


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_adapter_file_is_refused(case: Case, good_adapter: Path, make_tiny_bert) -> None:
    if case.corrupt is not None:
        case.corrupt(good_adapter)
    model = make_tiny_bert(1 if case.other_base else 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = snapshot(good_adapter.parent)
    with pytest.raises(case.error, match=case.match):
        load_adapter(model, good_adapter)
    assert not adapter_layers(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert snapshot(good_adapter.parent) == files


# ------------------------------------------------------------------ through the CLI
def _write_csv(path: Path, n: int = 48) -> Path:
    rng = random.Random(0)
    words = {"neg": ["dull", "awful", "boring"], "pos": ["great", "fun", "lovely"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(n):
            y = ("neg", "pos")[i % 2]
            w.writerow([" ".join(rng.choice(words[y]) for _ in range(4)), y])
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny-BERT run whose base was shifted by the ``svd`` data-aware init."""
    root = tmp_path_factory.mktemp("adapter_files")
    mp = pytest.MonkeyPatch()
    mp.setenv("ADARANK_CACHE_DIR", str(root / "cache"))
    mp.setenv("WANDB_MODE", "disabled")
    argv = [
        "fit",
        "quickstart",
        "model.name_or_path=tiny-bert",
        f"data.train_file={_write_csv(root / 'd.csv')}",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.val_size=8",
        "data.batch_size=8",
        "data.max_length=16",
        "adapter.target_modules=[query,value]",
        "adapter.init_rank=2",
        "adapter.budget=300",
        "adapter.init=svd",
        "adapter.init_args={num_batches: 1}",
        "trainer.max_epochs=-1",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "logger.wandb=false",
        f"run.dir={root / 'run'}",
    ]
    try:
        assert main(argv) == 0
    finally:
        mp.undo()
    config = json.loads((root / "run" / "adapter" / CONFIG).read_text())
    assert any(c["shift_rank"] for c in config["layers"].values())  # the base was shifted
    return root / "run"


def test_cli_exports_the_uncorrupted_run(finished: Path, tmp_path: Path) -> None:
    assert main(["export", str(finished), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def _other_seed(run: Path) -> None:
    """Point the run's config at other base weights of the same architecture."""
    path = run / "config.yaml"
    text = path.read_text()
    assert "  seed: 0\n" in text  # model.seed
    path.write_text(text.replace("seed: 0\n", "seed: 1\n"))


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix) and tensors[k].numel())


def _nan_in_run(d: Path) -> None:
    _tensors(lambda t: _poison(_first(t, ".lora_Q"), (0, 0), float("nan"))(t))(d)


def _layer_7(d: Path) -> None:
    name = next(iter(json.loads((d / CONFIG).read_text())["layers"]))
    _rename_layer(name, name.replace("layer.0", "layer.7").replace("layer.1", "layer.7"))(d)


CLI_CASES = [
    Case("truncated", _bytes(lambda b: b[: len(b) // 2]), r"adapter\.safetensors.*truncated"),
    Case("nan_tensor", _nan_in_run, r"tensor \S+\.lora_Q in \S+adapter\.safetensors has 1 non-finite"),
    Case("extra_tensor", _tensors(_set("extra.lora_P", torch.zeros(2, 1))), r"\['extra\.lora_P'\] that the adapter config does not describe"),
    Case("no_layers_key", _config(_drop("layers")), r"adapter_config\.json lacks the key 'layers'"),
    Case("wrong_version", _config(lambda c: c.update(format_version=2)), r"unknown adapter format_version 2"),
    Case("config_not_json", _bytes(lambda b: b[:40], CONFIG), r"adapter_config\.json is not valid JSON"),
    Case("layer_not_in_model", _layer_7, r"no module\(s\) \['\S+layer\.7\S+'\] named in \S+adapter_config\.json"),
    Case("different_base_weights", _other_seed, r"other base weights: 4 of 4 adapted layer", other_base=True),
]  # fmt: skip


def test_corpus_size() -> None:
    for cases in (CASES, CLI_CASES):
        assert len({c.id for c in cases}) == len(cases)
    assert len(CASES) >= 10 and len(CLI_CASES) >= 5


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_export_refuses_bad_adapter(
    case: Case, finished: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    case.corrupt(run if case.other_base else run / "adapter")
    files = snapshot(tmp_path)
    out = tmp_path / "merged"
    capsys.readouterr()
    code = main(["export", str(run), "--format", "merged", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("adarank export: error:") and re.search(case.match, err), err
    assert not out.exists()
    assert snapshot(tmp_path) == files  # nothing created (no temporary dir left) or changed
