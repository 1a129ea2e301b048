"""Shared helpers of the benchmark scripts (``bench_overhead.py``, ``bench_quality.py``).

Kept out of the ``adarank`` package on purpose: it imports PEFT (the ``bench`` extra) and only
the benchmark scripts need it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from adarank.runs_io import dumps_strict

#: MiniLM / BERT-style adapter targets: query/key/value/attention-output/intermediate/output
#: dense layers of every encoder layer (36 modules in MiniLM-L6), not the pooler
BERT_TARGET_REGEX = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
#: GPT-2 style targets: c_attn, attention c_proj, mlp c_fc and c_proj of every block
GPT2_TARGET_REGEX = r".*h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))"


def machine_info() -> dict:
    """CPU model, core count, library versions and the date (for every results table)."""
    cpu = platform.processor() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "adarank"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "n/a"
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(dumps_strict(obj, indent=2))  # NaN/inf → null + a note
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append_jsonl(path: str | os.PathLike, record: Mapping) -> None:
    """Append one JSON record (one line) and flush, so partial results survive a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(dumps_strict(record) + "\n")
        fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file (missing file: empty list; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    vals = list(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def lora_rank_for_budget(per_rank_cost: int, budget: int) -> int:
    """Largest uniform LoRA rank whose parameter count does not exceed ``budget``."""
    if per_rank_cost <= 0:
        raise ValueError(f"per_rank_cost={per_rank_cost}: expected a positive count")
    return max(0, budget // per_rank_cost)


def linear_dims(model: nn.Module, target_regex: str) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of the ``nn.Linear``/``Conv1D`` modules matching the regex."""
    from adarank.modules.svd_lora import is_conv1d, linear_shape

    out = {}
    for name, mod in model.named_modules():
        if re.fullmatch(target_regex, name) and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            out[name] = linear_shape(mod)
    if not out:
        raise ValueError(f"target regex {target_regex!r} matched no linear module")
    return out


# ---------------------------------------------------------------------- PEFT AdaLoRA helpers
def adalora_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Final live rank per adapted module of a PEFT AdaLoRA model.

    Uses the rank pattern PEFT stores in its config (boolean mask per ``lora_E``), else the
    non-zero entries of ``lora_E`` (PEFT masks pruned triplets by zeroing λ, it never resizes).
    """
    cfg = peft_model.peft_config["default"]
    pattern = {
        k.split(".lora_E")[0]: v for k, v in (getattr(cfg, "rank_pattern", None) or {}).items()
    }
    out: dict[str, int] = {}
    for n, p in peft_model.named_parameters():
        if ".lora_E" not in n:
            continue
        module = _strip_peft(n.split(".lora_E")[0])
        mask = pattern.get(module)
        out[module] = int(sum(bool(v) for v in mask)) if mask is not None else p.shape[0]
    return out


def _strip_peft(name: str) -> str:
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def adalora_state_bytes(peft_model: nn.Module) -> int:
    """Bytes of PEFT AdaLoRA's RankAllocator buffers (ipt, exp_avg_ipt, exp_avg_unc)."""
    alloc = getattr(peft_model.base_model, "rankallocator", None)
    if alloc is None:
        return 0
    return sum(
        tensor_bytes(getattr(alloc, key, {}).values())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")
    )


def adapter_param_bytes(model: nn.Module, keys: tuple[str, ...] = ("lora_",)) -> int:
    """Bytes of parameters whose name contains one of ``keys`` (the physical adapter)."""
    return tensor_bytes(p for n, p in model.named_parameters() if any(k in n for k in keys))


def effective_params(ranks: Mapping[str, int], dims: Mapping[str, tuple[int, int]]) -> int:
    """Σ rank · (d_in + d_out + 1) over modules: parameters of the live triplets."""
    return sum(r * (dims[n][0] + dims[n][1] + 1) for n, r in ranks.items())


# ---------------------------------------------------------------------- tables
def _variant_labels(records: list[dict]) -> list[str]:
    """Per record, the settings (protocol / adarank options) that are not the same in every
    record of its method, e.g. ``interval=10`` — so different set-ups never share a row."""
    flat = []
    for r in records:
        cfg = dict(r.get("protocol") or {})
        cfg.update(
            {k.removeprefix("adarank_"): v for k, v in (r.get("adarank_config") or {}).items()}
        )
        flat.append(cfg)
    varying = {}  # method -> the keys whose values differ between its records
    for method in {r["method"] for r in records}:
        peers = [c for c, r in zip(flat, records) if r["method"] == method]
        keys = sorted({k for c in peers for k in c})
        varying[method] = [k for k in keys if len({json.dumps(c.get(k)) for c in peers}) > 1]
    return [
        ", ".join(f"{k}={cfg.get(k, '?')}" for k in varying[r["method"]]) or "–"
        for r, cfg in zip(records, flat)
    ]


def _peak(rs: list[dict]) -> str:
    """Largest physical adapter size over the runs (warm-up and growth); '?' for records written
    before ``physical_params_peak`` was recorded (PEFT's never change size: their start)."""
    peaks = [
        r.get("physical_params_peak")
        or (r["physical_params_start"] if r["method"] in ("lora", "adalora") else None)
        for r in rs
    ]
    return "?" if None in peaks else f"{max(peaks):,}"


def quality_table(records: list[dict]) -> str:
    """Markdown table: method × budget, mean ± sd validation accuracy at each method's eval lr."""
    evals = [r for r in records if r.get("phase", "eval") in ("eval", "tune")]
    variant = _variant_labels(evals)
    groups: dict[tuple, list[dict]] = {}
    for r, v in zip(evals, variant):
        groups.setdefault((r["budget_r"], r["method"], v, r["lr"]), []).append(r)
    lines = [
        "| budget (LoRA r) | method | settings that differ | lr | seeds | val acc (mean ± sd) | "
        "adapter params physical start → peak → end | effective end | allocator state | median step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (b, m, v, lr), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        mu, sd = mean_std(x["val_acc"] for x in rs)
        st = int(median(x["allocator_state_bytes"] or 0 for x in rs))
        lines.append(
            f"| {b} ({rs[0]['param_budget']:,}) | {m} | {v} | {lr:g} | {len(rs)} "
            f"| {mu:.4f} ± {sd:.4f} "
            f"| {rs[0]['physical_params_start']:,} → {_peak(rs)} → {rs[0]['physical_params_end']:,} "
            f"| {int(median(x['effective_params_end'] for x in rs)):,} | {st / 1024:.0f} KiB "
            f"| {median(x['step_s_median'] for x in rs):.3f} s |"
        )
    return "\n".join(lines)


def planted_table(records: list[dict]) -> str:
    """Markdown table of the planted-task runs (mean ± sd over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r.get("lr")), []).append(r)
    lines = [
        "| method | lr | seeds | rank recovery error | held-out MSE | final params "
        "(budget) | allocator state |",
        "|---|---|---|---|---|---|---|",
    ]
    for (m, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        e_mu, e_sd = mean_std(x["rank_recovery_error"] for x in rs)
        m_mu, m_sd = mean_std(x["heldout_mse"] for x in rs)
        lines.append(
            f"| {m} | {lr:g} | {len(rs)} | {e_mu:.3f} ± {e_sd:.3f} | {m_mu:.4f} ± {m_sd:.4f} "
            f"| {int(median(x['live_params'] for x in rs)):,} ({rs[0]['param_budget']:,}) "
            f"| {int(median(x['allocator_state_bytes'] for x in rs)) / 1024:.1f} KiB |"
        )
    return "\n".join(lines)
