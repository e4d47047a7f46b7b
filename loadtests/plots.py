"""PNG plots of a run, drawn from its JSON document (matplotlib, Agg backend).

    python -m loadtests.plots loadtests/results/bench-<stamp>.json   # redraw a run

Two kinds: latency percentiles against offered rate for each path (steady scenarios and
saturation probes), and latency over time for the scenarios with events or bursts, the
events marked. matplotlib lives here only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt
from matplotlib import ticker

COLORS = {"direct": "tab:green", "nginx": "tab:blue", "floor": "tab:gray", "sidecar": "tab:red"}
FALLBACK_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:gray")
PERCENTILE_STYLES = (("p50_us", "p50", "-", "o"), ("p99_us", "p99", "--", "s"))
DPI = 110


def _color(path: str, seen: dict[str, str]) -> str:
    if path in COLORS:
        return COLORS[path]
    if path.startswith("sidecar"):
        return COLORS["sidecar"]
    return seen.setdefault(path, FALLBACK_COLORS[len(seen) % len(FALLBACK_COLORS)])


def rate_points(doc: dict[str, Any]) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """Per path, (offered rate, stats) from steady scenarios and saturation probes at the
    run's default connection count, sorted by rate."""
    conns = doc["options"]["connections"]
    points: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for sc in doc["scenarios"]:
        if sc["kind"] == "steady" and sc["connections"] == conns:
            for name, s in sc["paths"].items():
                points.setdefault(name, []).append((s["target_rps"], s))
        elif sc["kind"] == "saturation" and sc["connections"] == conns:
            for name, res in sc["search"].items():
                for p in res["probes"]:
                    points.setdefault(name, []).append((p["stats"]["target_rps"], p["stats"]))
    # One point per rate: where a steady scenario and a probe share it, the larger sample.
    out = {}
    for name, pts in points.items():
        best: dict[int, tuple[float, dict[str, Any]]] = {}
        for rate, s in pts:
            key = round(rate)
            if key not in best or s["requests"] > best[key][1]["requests"]:
                best[key] = (rate, s)
        out[name] = [best[k] for k in sorted(best)]
    return out


def plot_rates(doc: dict[str, Any], out: Path) -> Path | None:
    points = rate_points(doc)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen: dict[str, str] = {}
    for path, pts in points.items():
        color = _color(path, seen)
        rates = [r for r, _ in pts]
        for key, label, style, marker in (*PERCENTILE_STYLES, ("p999_us", "p99.9", ":", "^")):
            values = [max(s[key], 1) if s["ok"] else math.nan for _, s in pts]
            ax.plot(rates, values, style, marker=marker, color=color, label=f"{path} {label}")
    limit = doc["options"].get("sat_limit_us", 1000)
    ax.axhline(limit, color="black", linewidth=0.8, alpha=0.6)
    ax.annotate(
        f"{limit / 1000:g} ms", (0.005, limit), xycoords=("axes fraction", "data"), va="bottom"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted({round(r) for pts in points.values() for r, _ in pts}))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency from intended send (us)")
    ax.set_title(f"Latency percentiles against rate ({doc['options']['connections']} conns)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_timeline(sc: dict[str, Any], out: Path) -> Path:
    """Latency over time (p50, p99, max per window) and failures, events marked."""
    fig, (ax, axf) = plt.subplots(
        2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    seen: dict[str, str] = {}
    width = sc["window_s"]
    for path, windows in sc["timeline"].items():
        color = _color(path, seen)
        t = [w["t_s"] + width / 2 for w in windows]
        for key, label, style, alpha in (
            ("p50_us", "p50", "-", 1.0),
            ("p99_us", "p99", "--", 1.0),
            ("max_us", "max", ":", 0.6),
        ):
            ax.plot(
                t,
                [w[key] for w in windows],
                style,
                color=color,
                alpha=alpha,
                label=f"{path} {label}",
            )
        axf.bar(
            t, [w["failed"] for w in windows], width=width * 0.9, color=color, alpha=0.7, label=path
        )
    for start, end in sc.get("bursts", []):
        ax.axvspan(start, end, color="orange", alpha=0.15)
        axf.axvspan(start, end, color="orange", alpha=0.15)
    for ev in sc.get("events", []):
        for a in (ax, axf):
            a.axvline(ev["start_s"], color="black", linewidth=1.2)
        ax.annotate(
            ev["name"],
            (ev["start_s"], 0.98),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
            zorder=10,
        )
        labelled: set[str] = set()
        for name, at in ev.get("sidecar_events", []):
            ax.axvline(at, color="gray", linestyle="--", linewidth=0.8)
            if name in labelled:
                continue  # a repeated event (a retry every backoff) is a line, not a label
            labelled.add(name)
            ax.annotate(
                name,
                (at, 0.02),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="bottom",
                ha="left",
                fontsize=7,
                color="gray",
            )
    ax.set_yscale("log")
    ax.set_ylabel("latency from intended send (us)")
    ax.set_title(
        "\n".join(
            textwrap.wrap(f"{sc['name']}: {sc['description']} ({width * 1000:.0f} ms windows)", 90)
        ),
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=7)
    axf.set_ylabel("failed")
    axf.set_xlabel("seconds since start")
    axf.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend below
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def draw_all(doc: dict[str, Any], results_dir: Path) -> list[Path]:
    """Every plot of the run, as results_dir/bench-<stamp>-<what>.png; returns the files."""
    stamp = doc["stamp"]
    written = []
    rates = plot_rates(doc, results_dir / f"bench-{stamp}-rate.png")
    if rates is not None:
        written.append(rates)
    written.extend(
        plot_timeline(sc, results_dir / f"bench-{stamp}-{sc['name']}.png")
        for sc in doc["scenarios"]
        if sc.get("timeline")
    )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.plots", description=__doc__)
    parser.add_argument("json", type=Path, help="a bench-<stamp>.json of loadtests.bench")
    args = parser.parse_args(argv)
    doc = json.loads(args.json.read_text())
    for path in draw_all(doc, args.json.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
