"""Turn benchmark runs into medians, ratios, a markdown table, a JSON file and a PNG chart.

Every figure is the median of the repetitions; its spread is half the min-max range relative to
the median (so "±3%" means all runs fell within 3% either side). A ratio is pgws divided by its
baseline, both medians; whether higher or lower is better is stated per row.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

Better = Literal["higher", "lower"]


@dataclasses.dataclass(frozen=True)
class Stat:
    """The repetitions of one figure."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median, or NaN without values."""
        return statistics.median(self.values) if self.values else math.nan

    @property
    def spread(self) -> float:
        """Half the min-max range relative to the median (0.03 = ±3%); NaN if undefined."""
        if len(self.values) < 2 or not self.median:
            return math.nan
        return (max(self.values) - min(self.values)) / 2 / abs(self.median)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "values": list(self.values),
            "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "spread": self.spread,
        }


# target -> scenario -> metric -> Stat
Summary = dict[str, dict[str, dict[str, Stat]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the table: a figure for the server under test and its baseline."""

    scenario: str  # key in the summary, e.g. "fanout-1000"
    label: str  # e.g. "fan-out, 1,000 readers"
    metric: str  # key in the summary, e.g. "delivered_per_s"
    metric_label: str
    unit: str  # one of the keys of _FORMATS
    baseline_target: str  # "raw-gw" or "raw-pg"
    baseline_scenario: str
    better: Better | None = None  # None: informative only, no ratio
    goal: float | None = None  # the target for the ratio
    chart: bool = True


def aggregate(runs: Iterable[Mapping[str, Any]]) -> Summary:
    """Collect each (target, scenario, metric) over the runs that did not fail."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        if run.get("error"):
            continue
        metrics = collected.setdefault(run["target"], {}).setdefault(run["scenario"], {})
        for name, value in run["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.setdefault(name, []).append(float(value))
    return {
        target: {
            scenario: {name: Stat(tuple(values)) for name, values in metrics.items()}
            for scenario, metrics in scenarios.items()
        }
        for target, scenarios in collected.items()
    }


def lookup(summary: Summary, target: str, scenario: str, metric: str) -> Stat | None:
    """The Stat for one figure, if it was measured."""
    return summary.get(target, {}).get(scenario, {}).get(metric)


def ratio(row: Row, summary: Summary, target: str) -> float | None:
    """Median of `target` over median of the baseline, for rows that have a direction."""
    if row.better is None:
        return None
    mine = lookup(summary, target, row.scenario, row.metric)
    base = lookup(summary, row.baseline_target, row.baseline_scenario, row.metric)
    if mine is None or base is None or not base.median or math.isnan(mine.median):
        return None
    return mine.median / base.median


def meets(row: Row, value: float | None) -> bool | None:
    """Whether a ratio meets the row's goal (None without goal or ratio)."""
    if row.goal is None or value is None:
        return None
    return value >= row.goal if row.better == "higher" else value <= row.goal


def _si(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


_FORMATS: dict[str, Callable[[float], str]] = {
    "rate": _si,
    "pct": lambda v: f"{v:.0f}%",
    "ms": lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}",
    "mib": lambda v: f"{v:.1f}",
    "kib": lambda v: f"{v:.1f}",
    "bytes": lambda v: f"{v:.0f} B",
    "loss": lambda v: "0" if v == 0 else f"{100 * v:.3g}%",
}


def cell(stat: Stat | None, unit: str, *, spread: bool = True) -> str:
    """Median and spread, e.g. `242.4k ±2%`; `n/a` when not measured."""
    if stat is None or not stat.values:
        return "n/a"
    text = _FORMATS[unit](stat.median)
    if spread and unit != "loss" and not math.isnan(stat.spread):
        text += f" ±{100 * stat.spread:.0f}%"
    return text


def _goal_text(row: Row) -> str:
    if row.goal is None:
        return ""
    return f"{'≥' if row.better == 'higher' else '≤'} {row.goal:g}"


def table(rows: Sequence[Row], summary: Summary, target: str) -> str:
    """The markdown table: scenario, metric, server, baseline, ratio, goal."""
    lines = [
        f"| scenario | metric | {target} | baseline | ratio | better | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mine = lookup(summary, target, row.scenario, row.metric)
        base = lookup(summary, row.baseline_target, row.baseline_scenario, row.metric)
        value = ratio(row, summary, target)
        verdict = meets(row, value)
        ratio_text = "" if value is None else f"{value:.3f}" if value < 10 else f"{value:.0f}"
        if verdict is not None:
            ratio_text += " ✓" if verdict else " ✗"
        lines.append(
            f"| {row.label} | {row.metric_label} | {cell(mine, row.unit)} | "
            f"{cell(base, row.unit)} {row.baseline_target} | {ratio_text} | "
            f"{row.better or ''} | {_goal_text(row)} |"
        )
    return "\n".join(lines)


def diagnostics(summary: Summary) -> str:
    """Where the CPU went in each scenario (medians): one line per target and scenario."""
    lines = [
        "| target | scenario | server CPU | server waited | loadgen CPU | loadgen waited "
        "| PostgreSQL CPU | other CPU | steal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, scenarios in summary.items():
        for scenario, metrics in scenarios.items():
            if "loadgen_cpu_pct" not in metrics:
                continue
            lines.append(
                f"| {target} | {scenario} | "
                + " | ".join(
                    cell(metrics.get(name), "pct", spread=False)
                    for name in (
                        "server_cpu_pct",
                        "server_wait_pct",
                        "loadgen_cpu_pct",
                        "loadgen_wait_pct",
                        "pg_cpu_pct",
                        "other_cpu_pct",
                        "steal_pct",
                    )
                )
                + " |"
            )
    return "\n".join(lines)


def chart(rows: Sequence[Row], summary: Summary, target: str, path: Path, title: str) -> bool:
    """Draw the ratios as horizontal bars (green: at least as good as the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    shown: list[tuple[Row, float]] = []
    for row in rows:
        value = ratio(row, summary, target) if row.chart else None
        if value is not None:
            shown.append((row, value))
    if not shown:
        return False
    height = 0.9 + 0.32 * len(shown)
    figure, axes = plt.subplots(figsize=(11, height))
    labels = [f"{row.label}: {row.metric_label} ({row.better} is better)" for row, _ in shown]
    values = [value for _, value in shown]
    colors = [
        "#2e7d32" if (value >= 1 if row.better == "higher" else value <= 1) else "#c62828"
        for row, value in shown
    ]
    positions = list(range(len(shown)))[::-1]
    # Ratios are multiplicative: a log axis shows 0.5 and 2 as equally far from parity, and bars
    # grow from 1 so that a slower server points left whatever its size.
    axes.barh(positions, [value - 1 for value in values], left=1, color=colors, height=0.6)
    for position, (row, value) in zip(positions, shown, strict=True):
        axes.text(
            value,
            position,
            f" {value:.2f} ",
            va="center",
            fontsize=8,
            ha="left" if value >= 1 else "right",
        )
        if row.goal is not None:
            axes.plot([row.goal, row.goal], [position - 0.4, position + 0.4], color="black", lw=1.5)
    axes.axvline(1.0, color="grey", lw=1)
    axes.set_xscale("log")
    axes.set_xlim(min(0.5, min(values) / 2.5), max(2.0, max(values) * 4))
    axes.set_yticks(positions, labels, fontsize=8)
    axes.set_xlabel(f"{target} / baseline, medians (log scale); black tick: the issue's goal")
    axes.set_title(title, fontsize=9)
    axes.legend(
        handles=[
            matplotlib.patches.Patch(color="#2e7d32", label="as good as the baseline or better"),
            matplotlib.patches.Patch(color="#c62828", label="worse than the baseline"),
        ],
        fontsize=7,
        loc="lower right",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def summary_json(summary: Summary) -> dict[str, Any]:
    """The summary with every Stat spelled out."""
    return {
        target: {
            scenario: {name: stat.as_dict() for name, stat in metrics.items()}
            for scenario, metrics in scenarios.items()
        }
        for target, scenarios in summary.items()
    }


def rows_json(rows: Sequence[Row], summary: Summary, target: str) -> list[dict[str, Any]]:
    """Each table row with its figures, ratio and verdict."""
    result = []
    for row in rows:
        mine = lookup(summary, target, row.scenario, row.metric)
        base = lookup(summary, row.baseline_target, row.baseline_scenario, row.metric)
        value = ratio(row, summary, target)
        result.append(
            {
                **dataclasses.asdict(row),
                "value": mine.as_dict() if mine else None,
                "baseline": base.as_dict() if base else None,
                "ratio": value,
                "meets_goal": meets(row, value),
            }
        )
    return result
