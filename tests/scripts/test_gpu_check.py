"""``scripts/gpu_check.sh`` stays runnable without a GPU to try it on.

``--dry-run`` prints every command; each is checked against what it calls: the benchmark's
options, the ``adarank`` parser, and the config validator for the fit overrides (the 4-bit run's
only problem on a CPU machine is the missing CUDA / bitsandbytes). The table helper renders the
statuses of steps that did not run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adarank.cli import build_parser
from adarank.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _dry_run(tmp_path: Path) -> list[list[str]]:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), "--work",
         str(tmp_path / "work"), "--python", sys.executable],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _by_step(commands: list[list[str]]) -> dict[str, list[str]]:
    steps = {}
    for cmd in commands:
        if cmd[0] == "timeout":
            assert int(cmd[1]) <= 240 and cmd[2] == sys.executable
            rest = cmd[3:]
            key = rest[1] if rest[0] == "scripts/_gpu_check.py" else rest[0]
            if key == "peak":
                key = "fit " + ("4bit" if "model.quantization=4bit" in rest else "bf16")
            steps[key] = rest
        else:
            steps[cmd[0].rstrip(":")] = cmd
    return steps


def test_dry_run_lists_every_step_with_valid_arguments(tmp_path: Path) -> None:
    steps = _by_step(_dry_run(tmp_path))
    assert set(steps) == {
        "scripts/bench_overhead.py", "fit bf16", "save-smollm2", "fit 4bit", "-m", "compare",
        "sharded", "bitsandbytes",
    }  # fmt: skip
    bench = steps["scripts/bench_overhead.py"]
    assert bench[bench.index("--device") + 1] == "cuda"
    assert bench[bench.index("--precision") + 1] == "bf16"
    assert set(bench[bench.index("--configs") + 1].split(",")) >= {"adaptive", "lora", "adalora"}
    options = (ROOT / bench[0]).read_text()  # its argparse options
    assert all(f'"{flag}"' in options for flag in bench if flag.startswith("--"))
    assert "not implemented" in " ".join(steps["sharded"])

    bf16 = steps["fit bf16"][3:]  # scripts/_gpu_check.py peak PEAK.json fit sft ...
    assert bf16[:2] == ["fit", "sft"] and "trainer.accelerator=gpu" in bf16
    assert build_parser().parse_args(bf16).command == "fit"
    validate_config(load_config("sft", bf16[2:]))

    q4 = steps["fit 4bit"][3:]
    model_dir = next(a.split("=", 1)[1] for a in q4 if a.startswith("model.name_or_path="))
    assert model_dir == steps["save-smollm2"][2]
    Path(model_dir).mkdir(parents=True)  # what save-smollm2 writes
    if torch.cuda.is_available():
        pytest.skip("the quantization message below is the one of a machine without CUDA")
    with pytest.raises(ConfigError) as info:
        validate_config(load_config("sft", q4[2:]))
    problems = info.value.problems
    assert len(problems) == 1 and problems[0].startswith("model.quantization='4bit'")
    assert "CUDA GPU" in problems[0]

    export = steps["-m"][1:]  # -m adarank.cli export RUN --format merged ...
    assert export[0] == "adarank.cli"
    args = build_parser().parse_args(export[1:])
    assert (args.command, args.format, args.dtype) == ("export", "merged", "float32")
    assert args.run_dir == q4[-1].removeprefix("run.dir=")


def test_without_a_gpu_the_check_stops_with_exit_2(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "out"), "--python", sys.executable],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "gpu_check:" in proc.stderr and ("GPU" in proc.stderr or "cuda" in proc.stderr)


def test_table_reports_steps_that_did_not_run(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "status").mkdir(parents=True)
    out.mkdir()
    (work / "status" / "sft_bf16").write_text("timeout after 180s\n")
    args = [str(out), str(work), "skipped: bitsandbytes not installable here", "not implemented"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "_gpu_check.py"), "table", *args, "12"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    table = (out / "gpu_check.md").read_text()
    assert table.strip() in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| check | result | time | peak GPU memory")
    assert "| overhead" not in table and "| not run |" in rows[1]  # no overhead.json
    assert "| timeout after 180s |" in rows[2]
    assert "| skipped: bitsandbytes not installable here |" in rows[3]
    assert (
        rows[4].startswith("| sharded strategy on one device | skipped")
        and "not implemented" in rows[4]
    )
    assert "Total wall time of the check: 12 s." in table


def test_table_prints_the_cuda_memory_ratios_per_phase(tmp_path: Path) -> None:
    """The overhead step's per-step CUDA peaks become one row of adaptive / LoRA ratios per
    phase, total and adapter part (minus the floor run), computed from the benchmark's summary."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from _bench_overhead_report import memory_summary

    phase = ["warmup"] * 2 + ["decay"] * 2 + ["final"] * 2
    cuda = {
        "adaptive": [150, 160, 130, 120, 100, 100],
        "lora": [100] * 6,
        "floor": [50] * 6,
    }
    runs = [
        {
            "model": "gpt2", "config": cfg, "round": 0, "phase": phase,
            "memory": {"total": peaks, "saved": peaks, "trainable": peaks},
            "rss_step_peak_bytes": [1] * 6, "cuda_step_peak_bytes": peaks,
        }
        for cfg, peaks in cuda.items()
    ]  # fmt: skip
    summary = {"memory": {"gpt2": memory_summary(runs, "gpt2", list(cuda))}}
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "status").mkdir(parents=True)
    out.mkdir()
    (out / "overhead.json").write_text(json.dumps({"runs": [], "summary": summary}))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "_gpu_check.py"), "table", str(out), str(work),
         "ok", "not implemented", "1"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    row = next(ln for ln in (out / "gpu_check.md").read_text().splitlines() if "by phase" in ln)
    # total: warm-up median 155/100, max 160/100; final 100/100
    assert "warm-up 1.550× (1.600×), decay 1.250× (1.300×), final 1.000× (1.000×)" in row
    # adapter part: (155 − 50) / (100 − 50) = 2.1, max (160 − 50) / 50 = 2.2
    assert "adapter part (minus floor): warm-up 2.100× (2.200×)" in row
    assert "final 1.000× (1.000×)" in row.split("adapter part")[1]
