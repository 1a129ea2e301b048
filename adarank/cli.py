"""The ``adarank`` command line.

::

    adarank fit RECIPE [dotted.key=value ...]     train; writes a run directory
    adarank fit --resume RUN_DIR [key=value ...]  continue a run from checkpoints/last.ckpt
    adarank fit --print-config RECIPE [...]       print the resolved config; no training
    adarank validate RECIPE [key=value ...]       check a config without training
    adarank recipes                               list the shipped recipes
    adarank analyze RUN_DIR ...                   (adarank.analysis.cli, when installed)
    adarank export RUN_DIR ...                    (adarank.export.cli, when installed)

RECIPE is a YAML path or a shipped recipe name (``quickstart``). Exit codes: 0 success,
1 training failed (the run's ``summary.json`` says why; a diverged run keeps the adapter of its
last finite step), 2 bad input (config, data, budget, schedule, checkpoint) — reported before
any file is written. ``validate`` runs the same checks as ``fit`` (it builds the data and the
model) and writes nothing. A rejected ``--resume`` leaves the run untouched; ``--resume`` of a
run that stopped before its first checkpoint restarts it from step 0.

``trainer.strategy=ddp trainer.devices=N`` trains in N processes: Lightning starts the others by
running the same command line, and they join the run directory of the first
(:mod:`adarank.runs_ddp`); only the first writes and reports, every process exits with the same
code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_PLUGINS = ("adarank.analysis.cli", "adarank.export.cli")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _cmd_recipes(args: argparse.Namespace) -> int:
    from adarank.config import list_recipes

    recipes = list_recipes()
    width = max((len(n) for n, _, _ in recipes), default=0)
    for name, desc, _ in recipes:
        print(f"{name:<{width}}  {desc}")
    return EXIT_OK


def _print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the resolved config as YAML, then the static checks; builds nothing."""
    from omegaconf import OmegaConf

    from adarank.config import load_config, validate_config

    if getattr(args, "resume", None) is not None:
        from adarank.runs import CONFIG_NAME

        overrides = ([args.recipe] if args.recipe else []) + list(args.overrides)
        path = os.path.join(args.resume, CONFIG_NAME)
        cfg = load_config(path, [*overrides, f"run.dir={args.resume}"])
    elif not args.recipe:
        raise _UsageError(f"{args.command}: give a RECIPE (path or shipped name)")
    else:
        cfg = load_config(args.recipe, args.overrides)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="", flush=True)
    validate_config(cfg)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from adarank.runs import prepare

    if args.print_config:
        _print_config(args)
    p = prepare(args.recipe, args.overrides)
    budget = p.module.param_budget
    print(
        f"{args.recipe}: ok (run.dir would be {p.run_dir}; "
        f"{p.total_steps if p.total_steps is not None else 'unknown'} optimizer steps; "
        f"budget {_fmt_params(budget)} adapter params)"
    )
    return EXIT_OK


def _fmt_params(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def _report(summary: dict) -> None:
    run_dir = summary["run_dir"]
    metrics = summary.get("metrics", {})
    shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if v is not None)
    budget = summary.get("param_budget")
    live = summary.get("adapter_params", 0)
    used = f" ({100 * live / budget:.1f}% of the budget)" if budget else ""
    print()
    print(
        f"adarank fit: {summary['recipe']} finished: {summary['steps']} steps in {summary['wall_s']:.0f} s"
    )
    print(f"  final validation: {shown or '(no validation metrics)'}")
    print(f"  budget: {_fmt_params(budget)} adapter params; live adapter params {live:,}{used}")
    print(
        f"  trainable params at the end: {summary['trainable_params']:,} "
        f"(adapter {live:,} + saved modules {summary.get('saved_params', 0):,})"
    )
    print(f"  run directory: {run_dir}  (summary.json, config.yaml, adapter/, checkpoints/)")
    print(
        f"  rank evolution: {run_dir}/rank_heatmap.png, {run_dir}/ranks.csv, {run_dir}/budget.csv"
    )
    if os.path.isdir(os.path.join(run_dir, "logs", "wandb")):
        print(
            f"  W&B (offline): {run_dir}/logs/wandb  (upload with `wandb sync {run_dir}/logs/wandb/offline-run-*`)"
        )
    print(f"  analyse: adarank analyze {run_dir}")
    for warning in summary.get("warnings", []):
        print(f"adarank fit: warning: {warning}", file=sys.stderr)


def _prepare_fit(args: argparse.Namespace):
    """The run to train: joined (a process launched for DDP), resumed, or new."""
    from adarank.runs import prepare, prepare_resume
    from adarank.runs_ddp import join_request, prepare_join, process_index

    joining = join_request()
    if joining is not None:  # launched by process 0 of `fit`: its command line is ours
        args.command = f"fit (process {process_index()})"  # names this process in errors
        return prepare_join(joining)
    if args.resume is not None:
        overrides = ([args.recipe] if args.recipe else []) + list(args.overrides)
        prepared = prepare_resume(args.resume, overrides)
        if prepared.restart:
            print(
                f"adarank fit: {args.resume} stopped before its first checkpoint: restarting it "
                "from step 0 (the outputs of the stopped attempt are replaced)",
                file=sys.stderr,
            )
        return prepared
    if not args.recipe:
        raise _UsageError("fit: give a RECIPE (path or shipped name) or --resume RUN_DIR")
    return prepare(args.recipe, args.overrides)


def _cmd_fit(args: argparse.Namespace) -> int:
    from adarank.lightning.divergence import TrainingDiverged
    from adarank.runs import execute

    if args.print_config:
        return _print_config(args)
    prepared = _prepare_fit(args)
    main_process = not prepared.joined  # the others leave the reports to process 0
    try:
        summary = execute(prepared)
    except TrainingDiverged as err:
        if main_process:
            print(
                f"adarank fit: training failed at step {err.step}: {err.reason}\n"
                f"  adapter (last finite step): {prepared.run_dir}/adapter\n"
                f"  details: {prepared.run_dir}/summary.json",
                file=sys.stderr,
            )
        return EXIT_FAILED
    except KeyboardInterrupt:
        if main_process:
            print(
                f"\nadarank fit: interrupted; continue with `adarank fit --resume "
                f"{prepared.run_dir}`",
                file=sys.stderr,
            )
        return EXIT_FAILED
    except Exception as err:  # reported here and recorded in summary.json (by process 0)
        details = f"\n  details: {prepared.run_dir}/summary.json" if main_process else ""
        print(
            f"adarank {args.command}: training failed: {type(err).__name__}: {err}{details}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if main_process:
        _report(summary)
    return EXIT_OK


class _UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands of installed plugins included)."""
    parser = argparse.ArgumentParser(
        prog="adarank",
        description="Fine-tune with SVD-LoRA adapters whose ranks are allocated under a "
        "parameter budget.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a recipe and write a run directory")
    fit.add_argument("recipe", nargs="?", help="recipe YAML path or shipped recipe name")
    fit.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    fit.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from checkpoints/last.ckpt (only trainer.*, logger.*, "
        "callbacks.*, optimizer.nonfinite / max_skipped_steps and data.num_workers may be "
        "overridden; a rejected resume changes no file); a run that stopped before its first "
        "checkpoint is restarted from step 0",
    )
    fit.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML) and exit without building or training",
    )
    fit.set_defaults(handler=_cmd_fit)
    val = sub.add_parser(
        "validate",
        help="run every check of fit (builds data and model) without training or writing",
    )
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*")
    val.add_argument(
        "--print-config", action="store_true", help="print the resolved config, then validate"
    )
    val.set_defaults(handler=_cmd_validate)
    rec = sub.add_parser("recipes", help="list the shipped recipes")
    rec.set_defaults(handler=_cmd_recipes)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 failed run, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    from adarank.config import ConfigError

    try:
        result = args.handler(args)
    except (ConfigError, _UsageError) as err:
        print(f"adarank {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, TypeError, OSError, KeyError) as err:
        # raised while loading data / building the model, before any run directory exists
        print(f"adarank {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
