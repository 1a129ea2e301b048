"""``adarank export RUN_DIR --format merged|peft|adapter --out DIR``.

``merged``: a plain transformers ``save_pretrained`` directory with every ΔW folded in (plus the
tokenizer); ``peft``: a PEFT LoRA adapter directory for ``PeftModel.from_pretrained``;
``adapter``: the native adarank adapter files. Bad input (no run, no adapter, PEFT missing, a
non-empty destination) prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adarank.export.merged import export_merged
from adarank.export.native import copy_adapter
from adarank.export.peft_export import export_peft

__all__ = ["FORMATS", "add_parser", "export_run", "run_export"]

FORMATS = ("merged", "peft", "adapter")
EXIT_BAD_INPUT = 2
#: PEFT task type for a run's task (``adarank.runs.Run.task``)
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on an ``argparse`` subparsers object.

    The handler is stored as ``handler`` (``args.handler(args) -> exit code``), as
    ``adarank.cli.main`` expects.
    """
    parser = subparsers.add_parser(
        "export",
        help="export a trained run as a merged model, a PEFT LoRA adapter or adapter files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="run directory written by `adarank fit`")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="--format merged: dtype of the written weights (default: the base's; a quantized "
        "base is dequantized into model.dtype)",
    )
    parser.add_argument(
        "--task-type",
        default=None,
        help="PEFT task type recorded with --format peft (SEQ_CLS, CAUSAL_LM, ...); default: "
        "from the run's task (classification → SEQ_CLS, causal_lm → CAUSAL_LM)",
    )
    parser.set_defaults(handler=run_export)
    return parser


def _load_run(run_dir: Path) -> Any:
    """Rebuild the base model + tokenizer of a run and load its adapter (``adarank.runs``)."""
    from adarank.runs import load_run

    return load_run(run_dir)


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    task_type: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Export the final adapter of ``run_dir`` in format ``fmt`` to ``out``.

    ``dtype`` (merged only): dtype of the written weights; a quantized base is dequantized
    into it (see :func:`adarank.export.merged.merge_and_unwrap`).

    Raises:
        ValueError: unknown format, or the run has no adapter.
        FileNotFoundError: no such run directory / no ``config.yaml``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    if dtype is not None and fmt != "merged":
        raise ValueError(f"--dtype {dtype}: applies to --format merged only, not {fmt!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(
            f"run {str(run_dir)!r} has no adapter: expected {adapter_dir}/adapter_config.json "
            "(did training finish?)"
        )
    if fmt == "adapter":
        return copy_adapter(adapter_dir, out, overwrite=overwrite)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"run {str(run_dir)!r} has no config.yaml, so its base model cannot be rebuilt"
        )
    run = _load_run(run_dir)
    model = run.model
    if fmt == "merged":
        tokenizer = getattr(run, "tokenizer", None)
        return export_merged(
            model, out, tokenizer=tokenizer, overwrite=overwrite, inplace=True, dtype=dtype
        )
    if task_type is None:
        task_type = PEFT_TASK_TYPES.get(getattr(run, "task", None))
    name = _base_name(run)
    figure = run_dir / "rank_heatmap.png"
    return export_peft(
        model,
        out,
        base_model_name_or_path=name,
        task_type=task_type,
        overwrite=overwrite,
        param_budget=_param_budget(run_dir),
        rank_figure=figure if figure.is_file() else None,
        notes=_base_notes(name),
    )


def _param_budget(run_dir: Path) -> int | None:
    """``param_budget`` of the run's ``summary.json`` (None when absent or unreadable)."""
    try:
        value = json.loads((run_dir / "summary.json").read_text()).get("param_budget")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _base_notes(name: str | None) -> list[str]:
    """Model-card notes on where a built-in base model's weights came from."""
    from adarank.models.hf import BUILTIN_HUB_IDS, TINY_MODELS
    from adarank.models.llm import GGUF_BUILTINS

    if name in GGUF_BUILTINS:
        return [
            f"Trained on the dequantised weights of {GGUF_BUILTINS[name].filename} (a GGUF "
            f"quantisation of {BUILTIN_HUB_IDS[name]}); on the original weights the outputs "
            "differ slightly."
        ]
    if name in TINY_MODELS:
        return [
            f"The base model is adarank's random-init {name!r}, built in code (not on the Hub): "
            f"adarank.models.build_hf_model({name!r}, ...) with the run's model seed."
        ]
    return []


def _base_name(run: Any) -> str | None:
    """``model.name_or_path`` of the run's config (built-ins become Hub ids in the export)."""
    try:
        name = run.config.model.get("name_or_path")
    except AttributeError:
        return None
    return None if name is None else str(name)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``adarank export``; returns the process exit code (0, or 2 for bad input)."""
    try:
        path = export_run(
            args.run_dir,
            args.format,
            args.out,
            overwrite=args.overwrite,
            task_type=args.task_type,
            dtype=args.dtype,
        )
    except _USER_ERRORS as err:
        print(f"adarank export: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {args.run_dir} as {args.format} to {path}")
    return 0
