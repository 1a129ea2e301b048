"""``adarank export``: argument wiring, the three formats, and exit code 2 on bad input.

The run is faked (``config.yaml`` + ``adapter/``) and ``_load_run`` is replaced by a function that
returns the adapted tiny model, so these tests do not depend on the training stack.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from adarank.export import cli
from adarank.modules import load_adapter, save_adapter


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adarank")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def run_dir(make_adapted, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny\n")
    save_adapter(make_adapted("bert"), run / "adapter")

    def fake_load_run(path):
        from transformers import BertTokenizer

        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
        model = make_adapted("bert")
        tokenizer = BertTokenizer(str(vocab))
        return SimpleNamespace(model=model, tokenizer=tokenizer, config=None, task="classification")

    monkeypatch.setattr(cli, "_load_run", fake_load_run)
    return run


def test_export_adapter_copies_native_files(
    run_dir, make_base, make_adapted, token_batch, logits, tmp_path
):
    args = _parse(["export", str(run_dir), "--format", "adapter", "--out", str(tmp_path / "out")])
    assert args.handler(args) == 0
    model = make_base("bert")
    load_adapter(model, tmp_path / "out")
    ids = token_batch()
    torch.testing.assert_close(
        logits(model, ids), logits(make_adapted("bert"), ids), atol=1e-6, rtol=0
    )


def test_export_merged_and_peft(
    run_dir, make_adapted, make_base, token_batch, logits, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = _parse(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")])
    assert args.handler(args) == 0
    assert "exported" in capsys.readouterr().out
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ids = token_batch()
    torch.testing.assert_close(
        logits(plain, ids), logits(make_adapted("bert"), ids), atol=1e-5, rtol=1e-5
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "m").vocab_size == 7
    args = _parse(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "p")])
    assert args.handler(args) == 0
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"  # from the run's task
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(make_base("bert"), tmp_path / "p").eval()
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(
        logits(loaded, ids), logits(make_adapted("bert"), ids), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_run", "does not exist"),
        ("no_adapter", "has no adapter"),
        ("no_config", "has no config.yaml"),
        ("out_not_empty", "is not empty"),
    ],
)
def test_bad_input_exits_with_code_2(setup, message, run_dir, tmp_path, capsys):
    run, out, fmt = run_dir, tmp_path / "out", "merged"
    if setup == "no_run":
        run = tmp_path / "missing"
    elif setup == "no_adapter":
        for f in (run / "adapter").iterdir():
            f.unlink()
        (run / "adapter").rmdir()
    elif setup == "no_config":
        (run / "config.yaml").unlink()
    else:
        out.mkdir()
        (out / "x").write_text("x")
        fmt = "adapter"
    args = _parse(["export", str(run), "--format", fmt, "--out", str(out)])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("adarank export: error:") and message in err


def test_unknown_format_is_rejected_by_argparse(run_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _parse(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
