"""Summaries of ``bench_overhead.py`` runs: per-configuration medians and paired ratios."""

from __future__ import annotations

from _bench_common import median

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
    return {"table": table, "ratios": ratios, "markdown": "\n".join(lines)}


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
