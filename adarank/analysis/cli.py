"""``adarank analyze RUN_DIR [--against OTHER_RUN_DIR] [--out DIR] [--wandb]``.

``adarank/cli.py`` registers this subcommand with :func:`add_parser`; :func:`main` runs it
standalone (``python -m adarank.analysis.cli RUN_DIR``). Exit codes: 0 success, 2 missing or
incompatible inputs (message on stderr).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run_analyze", "main"]

HELP = "analyse a finished run: rank evolution, spectra, subspace similarity, ΔW vs W"


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `adarank fit`")
    parser.add_argument(
        "--against",
        metavar="OTHER_RUN_DIR",
        help="second run (or adapter directory) with the same adapted layers, for φ grids",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/analysis)")
    parser.add_argument(
        "--base-weights",
        metavar="FILE",
        help="safetensors file with the pre-trained weights <layer>.weight (d_out, d_in); "
        "default RUN_DIR/base_weights.safetensors, else rebuild the model from config.yaml",
    )
    parser.add_argument(
        "--wandb", action="store_true", help="also log to W&B (offline unless WANDB_MODE is set)"
    )
    parser.add_argument("--wandb-project", default="adarank", help="W&B project (default adarank)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-direction baseline")
    parser.set_defaults(handler=run_analyze)
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on an ``argparse`` subparsers object; the handler is ``args.handler``."""
    parser = subparsers.add_parser(
        "analyze", help=HELP, description=__doc__.split("\n")[0] + "\n\n" + HELP
    )
    return _configure(parser)


def run_analyze(args: argparse.Namespace) -> int:
    """Handler: run the analysis, print where it went; return the exit code (2 on bad input)."""
    from adarank.analysis.analyze import analyze_run
    from adarank.analysis.run_files import AnalysisInputError

    try:
        result = analyze_run(
            args.run_dir,
            against=args.against,
            out_dir=args.out,
            base_weights_path=args.base_weights,
            wandb=args.wandb,
            wandb_project=args.wandb_project,
            seed=args.seed,
        )
    except (AnalysisInputError, FileNotFoundError) as err:
        print(f"adarank analyze: error: {err}", file=sys.stderr)
        return 2
    dvw = result.data["delta_vs_w"]
    if not dvw["available"]:
        print(f"adarank analyze: warning: ΔW vs W skipped: {dvw['reason']}", file=sys.stderr)
    print(f"wrote {result.report} and {len(result.figures)} figures to {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point."""
    parser = _configure(argparse.ArgumentParser(prog="adarank analyze", description=HELP))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
