"""Summaries of ``bench_overhead.py`` runs: per-configuration medians and paired ratios."""

from __future__ import annotations

from _bench_common import median
from _bench_memory import PHASES

SKIP = 2  # first optimizer steps excluded from timing (lazy init, allocator warm-up)
RATIOS = (
    ("adaptive", "lora"),
    ("adaptive", "adalora"),
    ("adaptive1x", "lora"),
    ("adaptive1x", "adalora"),
    ("fixed", "lora"),
    ("nostats", "lora"),
    ("adalora", "lora"),
    ("lora", "floor"),
)
#: memory ratios per phase (numerator, denominator); ``floor`` gives the adapter-attributable part
MEMORY_RATIOS = (
    ("adaptive", "lora"),
    ("adaptive1x", "lora"),
    ("fixed", "lora"),
    ("adalora", "lora"),
)


def step_metrics(run: dict, key: str, interval: int = 10) -> dict:
    """Mean, steady (median of plain steps) and amortised-at-``interval`` step time.

    ``extra_per_alloc`` is the mean time above the steady step of the allocation steps (and
    capture steps); ``extra_max`` the largest single allocation step's extra (a growth step:
    gradient capture + candidate SVDs). The amortised time charges ``extra_max`` once per
    ``interval`` steps, i.e. assumes every allocation grows, as most do in a long decay phase.
    """
    times = run[key][SKIP:]
    kinds = run["kind"][SKIP:]
    plain = [t for t, k in zip(times, kinds) if k == "plain"] or times
    steady = median(plain)
    extra = sum(t - steady for t, k in zip(times, kinds) if k != "plain")
    n_alloc = sum(k == "alloc" for k in kinds)
    extra_max = max([t - steady for t, k in zip(times, kinds) if k == "alloc"], default=0.0)
    return {
        "mean": sum(times) / len(times),
        "steady": steady,
        "extra_per_alloc": extra / n_alloc if n_alloc else 0.0,
        "extra_max": max(0.0, extra_max),
        "amortised": steady + max(0.0, extra_max) / interval,
    }


def summarize(runs: list[dict], models: list[str], configs: list[str]) -> dict:
    """Medians over rounds per (model, config) and paired per-round ratios, plus markdown."""
    table: dict = {}
    ratios: dict = {}
    lines = []
    for model in models:
        table[model] = {}
        by_cfg = {c: [r for r in runs if r["model"] == model and r["config"] == c] for c in configs}
        for cfg, rs in by_cfg.items():
            if not rs:
                continue
            row = {}
            for key in ("wall_s", "cpu_s"):
                ms = [step_metrics(r, key) for r in rs]
                for stat in ("mean", "steady", "extra_per_alloc", "extra_max", "amortised"):
                    row[f"{key[:-2]}_{stat}"] = median(m[stat] for m in ms)
            for key in (
                "params_start",
                "params_end",
                "state_bytes_peak",
                "adapter_end_bytes",
                "capture_bytes_peak",
                "rss_peak_bytes",
                "rss_train_delta_bytes",
            ):
                row[key] = median(r[key] for r in rs)
            row["alloc_s"] = (
                median(r["alloc_s"] for r in rs) if rs[0]["alloc_s"] is not None else None
            )
            row["state_over_adapter"] = row["state_bytes_peak"] / max(1, row["adapter_end_bytes"])
            table[model][cfg] = row
        ratios[model] = {}
        for a, b in RATIOS:
            if not (by_cfg.get(a) and by_cfg.get(b)):
                continue
            per = {}
            for key in ("cpu_mean", "cpu_amortised", "wall_mean", "wall_amortised"):
                src, stat = ("cpu_s" if key.startswith("cpu") else "wall_s"), key.split("_")[1]
                vals = []
                for ra in by_cfg[a]:
                    rb = [r for r in by_cfg[b] if r["round"] == ra["round"]]
                    if rb:
                        vals.append(step_metrics(ra, src)[stat] / step_metrics(rb[0], src)[stat])
                per[key] = median(vals)
            ratios[model][f"{a}/{b}"] = per
        lines += _markdown(model, table[model], ratios[model])
    memory = {m: memory_summary(runs, m, configs) for m in models}
    lines += [ln for m in models for ln in _memory_markdown(m, memory[m])]
    return {"table": table, "ratios": ratios, "memory": memory, "markdown": "\n".join(lines)}


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _markdown(model: str, rows: dict, ratios: dict) -> list[str]:
    out = [
        f"\n### {model}\n",
        "| config | adapter params start → end | CPU s/step mean | steady | largest alloc "
        "step extra | amortised @10 "
        "| wall s/step mean | alloc s (total) | state / final adapter | capture transient MiB "
        "| peak RSS MiB | RSS Δ train MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg, r in rows.items():
        alloc = "–" if r["alloc_s"] is None else f"{r['alloc_s']:.2f}"
        state = f"{r['state_over_adapter']:.3f}" if r["state_bytes_peak"] else "–"
        out.append(
            f"| {cfg} | {int(r['params_start']):,} → {int(r['params_end']):,} "
            f"| {r['cpu_mean']:.3f} | {r['cpu_steady']:.3f} | {r['cpu_extra_max']:.3f} "
            f"| {r['cpu_amortised']:.3f} "
            f"| {r['wall_mean']:.3f} | {alloc} | {state} | {_mib(r['capture_bytes_peak'])} "
            f"| {_mib(r['rss_peak_bytes'])} | {_mib(r['rss_train_delta_bytes'])} |"
        )
    out += [
        "",
        "| ratio (paired per round, median) | CPU mean | CPU amortised @10 | wall mean "
        "| wall amortised @10 |",
        "|---|---|---|---|---|",
    ]
    for name, v in ratios.items():
        out.append(
            f"| {name} | {v['cpu_mean']:.3f} | {v['cpu_amortised']:.3f} "
            f"| {v['wall_mean']:.3f} | {v['wall_amortised']:.3f} |"
        )
    return out


# ---------------------------------------------------------------------- memory per phase
def _series(run: dict) -> dict[str, list]:
    """Per-step figures of a run: allocator ``total``, ``saved``, ``rss`` and ``cuda``."""
    mem = run["memory"]
    return {
        "total": mem["total"],
        "saved": mem["saved"],
        "trainable": mem["trainable"],
        "rss": run["rss_step_peak_bytes"],
        "cuda": run.get("cuda_step_peak_bytes"),
    }


def _stat(values: list, phase_of_step: list, phase: str) -> tuple[float, float] | None:
    vals = [v for v, p in zip(values or [], phase_of_step) if p == phase and v is not None]
    return (median(vals), max(vals)) if vals else None


def phase_stats(run: dict) -> dict:
    """``{phase: {steps, <figure>_median, <figure>_max}}`` of one run (bytes)."""
    out = {}
    for phase in PHASES:
        steps = run["phase"].count(phase)
        if not steps:
            continue
        row = {"steps": steps}
        for name, values in _series(run).items():
            st = _stat(values, run["phase"], phase)
            if st is not None:
                row[f"{name}_median"], row[f"{name}_max"] = st
        out[phase] = row
    return out


def _minus(a: list | None, b: list | None) -> list | None:
    if a is None or b is None or None in a or None in b:
        return None
    return [x - y for x, y in zip(a, b)]


def _adapter_series(run: dict, floor: dict | None) -> dict[str, list | None]:
    """Adapter-attributable part per step: the run's figure minus ``floor``'s at the same step."""
    if floor is None:
        return {"adapter": None, "cuda_adapter": None}
    own, base = _series(run), _series(floor)
    return {
        "adapter": _minus(own["total"], base["total"]),
        "cuda_adapter": _minus(own["cuda"], base["cuda"]),
    }


def _ratio(a: tuple | None, b: tuple | None, i: int) -> float | None:
    return a[i] / b[i] if a and b and b[i] > 0 else None


def memory_summary(runs: list[dict], model: str, configs: list[str]) -> dict:
    """Per-phase figures per configuration and ratios per :data:`MEMORY_RATIOS` pair.

    Each ratio is paired within a round (median over the phase's steps, or max, of the per-step
    figure of each side), then the median over rounds. The adapter-attributable figure is a
    configuration's per-step figure minus ``floor``'s (same round where there is one).
    """
    rs = [r for r in runs if r["model"] == model and "memory" in r]  # older records: no memory
    floors = [r for r in rs if r["config"] == "floor"]

    def floor_of(run: dict) -> dict | None:
        same = [f for f in floors if f.get("round") == run.get("round")]
        return (same or floors or [None])[0]

    def stats(run: dict) -> dict:
        series = {**_series(run), **_adapter_series(run, floor_of(run))}
        return {ph: {k: _stat(v, run["phase"], ph) for k, v in series.items()} for ph in PHASES}

    per_cfg = {c: [(r, stats(r)) for r in rs if r["config"] == c] for c in configs}
    table = {}
    for cfg, items in per_cfg.items():
        if items:
            table[cfg] = {
                ph: {
                    f"{k}_{s}": median(st[ph][k][i] for _, st in items)
                    for k in items[0][1][ph]
                    if all(st[ph][k] is not None for _, st in items)
                    for i, s in enumerate(("median", "max"))
                }
                for ph in PHASES
                if items[0][1][ph]["total"] is not None
            }
    ratios = {}
    for a, b in MEMORY_RATIOS:
        if not (per_cfg.get(a) and per_cfg.get(b)):
            continue
        ratios[f"{a}/{b}"] = {}
        for ph in table.get(a, {}):
            row = {}
            for key in ("total", "adapter", "rss", "cuda", "cuda_adapter"):
                for i, s in enumerate(("median", "max")):
                    vals = [
                        _ratio(sa[ph][key], sb[ph][key], i)
                        for ra, sa in per_cfg[a]
                        for rb, sb in per_cfg[b]
                        if rb.get("round") == ra.get("round")
                    ]
                    if vals and None not in vals:
                        row[f"{key}_{s}"] = median(vals)
            ratios[f"{a}/{b}"][ph] = row
    return {"table": table, "ratios": ratios}


def _cell(row: dict, key: str) -> str:
    if f"{key}_median" not in row:
        return "–"
    return f"{_mib(row[f'{key}_median'])} ({_mib(row[f'{key}_max'])})"


def _rcell(row: dict, key: str) -> str:
    if f"{key}_median" not in row:
        return "–"
    return f"{row[f'{key}_median']:.3f} ({row[f'{key}_max']:.3f})"


def _memory_markdown(model: str, mem: dict) -> list[str]:
    if not mem["table"]:
        return []
    out = [
        f"\n#### {model}: peak memory per step by phase (MiB, median over steps (max))\n",
        "| config | phase | allocator total | of which saved activations | adapter part "
        "(− floor) | peak RSS | CUDA max allocated |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg, phases in mem["table"].items():
        for ph, row in phases.items():
            out.append(
                f"| {cfg} | {ph} | {_cell(row, 'total')} | {_cell(row, 'saved')} "
                f"| {_cell(row, 'adapter')} | {_cell(row, 'rss')} | {_cell(row, 'cuda')} |"
            )
    out += [
        "",
        "| ratio (paired per round, median) | phase | allocator total | adapter part "
        "| peak RSS | CUDA total | CUDA adapter part |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, phases in mem["ratios"].items():
        for ph, row in phases.items():
            cells = " | ".join(
                _rcell(row, k) for k in ("total", "adapter", "rss", "cuda", "cuda_adapter")
            )
            out.append(f"| {name} | {ph} | {cells} |")
    return out
