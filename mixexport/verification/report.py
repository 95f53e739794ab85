"""Human-readable reports: ``report.md`` and the latency PNG, from the JSON reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def parity_markdown(parity: dict[str, Any]) -> list[str]:
    lines = [f"## Parity: {parity['status']}", ""]
    lines += [f"Backend `{parity['backend']}` against the eager reference; tolerances per output "
              "(`|a-e| <= atol + rtol*|e|`); `max_rel` is norm-wise: max|a-e| / max|e|.", ""]
    if parity.get("gate_precision"):
        lines += [f"Held to the {parity['gate_precision']} tolerances and AUC gate, not {parity['precision']}'s: "
                  "externalized table rows are stored in a reduced dtype.", ""]
    lines += ["| request | output | max_abs | max_rel | cosine | min passing atol | result |",
              "|---|---|---|---|---|---|---|"]
    for req in parity["tensor"]:
        for o in req["outputs"]:
            result = "not checked" if req.get("status") == "not checked" else "PASS" if o["passed"] else "FAIL"
            lines.append(f"| {req['request']} | {o['name']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} | "
                         f"{o['cosine']:.9f} | {o['min_atol']:.3g} | {result} |")
    if parity.get("variation"):
        lines += ["", f"**Warning: {parity['variation']['message']}.**"]
    m = parity.get("metrics")
    lines.append("")
    if m and m.get("status") != "skipped":
        lines += [f"### Metric parity on {m['dataset']} ({m['rows']} rows, {m['requests']} requests)", "",
                  "| metric | eager | bundle | delta |", "|---|---|---|---|"]
        for key in ("auc", "logloss", "mean_prediction", "calibration"):
            v = m[key]
            lines.append(f"| {key} | {v['reference']:.6f} | {v['bundle']:.6f} | {v['delta']:.3g} |")
        lines += ["", "Ranking agreement per request: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m["ranking"].items())]
    elif m:
        lines.append(f"Metric parity skipped: {m['reason']}")
    ledger = parity.get("ledger")
    if ledger:
        lines += ["", "### Stage ledger (error vs eager after each stage, sample request)", "",
                  "| stage | output | max_abs | max_rel |", "|---|---|---|---|"]
        for row in ledger:
            for o in row["outputs"]:
                lines.append(f"| {row['stage']} | {o['name']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} |")
    return lines


def latency_markdown(latency: dict[str, Any]) -> list[str]:
    runners = latency["runners"]
    ns = latency["candidates"]
    lines = [f"## Latency: {latency['users']} user x N candidates, p50 ms (speedup vs eager)", "",
             f"Machine: {latency['machine']['cpu']}, {latency['machine']['cores']} cores, flags "
             f"{', '.join(latency['machine'].get('cpu_flags', [])) or 'none of note'}, "
             f"load average {latency['machine'].get('load_average')}.", "",
             "| runner | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    engines = latency.get("engines")
    if engines and not engines["executed"]:  # say it before the table: these are not engine timings
        lines[2:2] = [f"**{engines['backend']}: {engines['reason']}**; timed instead: {engines['checked_instead']}.", ""]
    for name, per in runners.items():
        cells = []
        for n in ns:
            e = per.get(str(n))
            cells.append("-" if e is None else f"{e['p50_ms']:.3g} ({e.get('speedup_vs_eager', 1):.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from mixexport.verification.split_gain import split_gain_markdown

    return lines + split_gain_markdown(latency)


def write_markdown(path: Path, title: str, parity: dict[str, Any] | None, latency: dict[str, Any] | None,
                   extra: list[str] | None = None) -> None:
    lines = [f"# {title}", ""]
    lines += extra or []
    if parity:
        lines += parity_markdown(parity) + [""]
    if latency:
        lines += latency_markdown(latency) + ["", "![latency](latency.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def plot_latency(latency: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, per in latency["runners"].items():
        ns = [int(n) for n in per]
        ax.plot(ns, [per[str(n)]["p50_ms"] for n in ns], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"candidates per request ({latency['users']} user)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("latency per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
