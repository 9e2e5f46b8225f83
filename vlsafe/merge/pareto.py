"""Scoring a sweep's merged models: three objectives read from each point's results.json, the Pareto front over
them, and pareto.json / pareto.png.

The objectives are the evaluation's own metrics (under its first refusal judge), pooled over every benchmark and
condition of the suite that reports them (sum of k over sum of n; see `objectives` for the interval):
  attack_success_rate  safety: harmful requests answered (lower is better)
  refusal_rate         over-refusal: benign-but-scary requests refused (lower is better)
  accuracy             helpfulness: checkable questions answered correctly (higher is better)
The front compares point estimates; the intervals are there to judge whether a difference between points is real.
"""

from __future__ import annotations

from typing import Optional, Sequence

from vlsafe.errors import VlsafeError

def _objectives() -> dict[str, tuple[str, bool]]:
    """metric name in results.json -> (its label, higher is better), from the one table in eval/benchmarks.yaml."""
    from vlsafe.eval.benchmarks import METRICS

    return {name: (METRICS[name].label, METRICS[name].higher_is_better)
            for name in ("attack_success_rate", "refusal_rate", "accuracy")}


OBJECTIVES = _objectives()


def front(values: Sequence[Sequence[float]], higher_is_better: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point dominates it: at least as good on every objective and strictly
    better on one. Points that tie on every objective do not dominate each other, so they share the front."""
    signs = [1.0 if higher else -1.0 for higher in higher_is_better]
    scored = [[s * v for s, v in zip(signs, point)] for point in values]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, point) for other in scored) for point in scored]


def _cells(report: dict) -> list[tuple[str, str, dict]]:
    """(metric, where, row) for every all-items row of results.json (schema v2, vlsafe/eval/RESULTS.md) of an
    objective: the first judge's refusal-based rows, and the answer-match rows of accuracy."""
    # 3 differs from 2 only in how ASR counts a non-answer and in extra non_answer_rate rows: same fields read here
    if report.get("schema_version") not in (2, 3) or not isinstance(report.get("results"), list):
        raise VlsafeError("merge sweep: results.json is not vlsafe.eval schema version 2 or 3")
    judges = [j.get("name") for j in report.get("judges") or [] if isinstance(j, dict)]
    first = judges[0] if judges else None
    return [(row["metric"], f"{row['benchmark']}/{row['condition']}", row) for row in report["results"]
            if row.get("metric") in OBJECTIVES and row.get("category") == "*"
            and (row["metric"] == "accuracy" or first is None or row.get("judge") == first)]


def objectives(report: dict) -> dict[str, Optional[dict]]:
    """The one place that reads results.json, by metric name: each objective pooled over its cells (sum of k over
    sum of n). With one cell the interval is results.json's own; pooled cells get a Wilson interval on the pooled
    counts (`ci_method` says which). A cell without a value is left out; an objective with no cell is None."""
    from vlsafe.eval.metrics import wilson

    pooled: dict[str, dict[str, dict]] = {name: {} for name in OBJECTIVES}
    for metric, where, cell in _cells(report):
        n, k, value = cell.get("n"), cell.get("k"), cell.get("value")
        if not n or value is None:
            continue
        pooled[metric][where] = {"value": value, "k": k, "n": n, "ci": cell.get("ci"),
                                 "judge": cell.get("judge")}
    out: dict[str, Optional[dict]] = {}
    for name, cells in pooled.items():
        if not cells:
            out[name] = None
            continue
        k, n = sum(c["k"] for c in cells.values()), sum(c["n"] for c in cells.values())
        only = next(iter(cells.values())) if len(cells) == 1 else None
        ci, method = (only["ci"], "results.json") if only and only["ci"] else (list(wilson(k, n)), "wilson, pooled")
        out[name] = {"value": k / n, "k": k, "n": n, "ci": ci, "ci_method": method,
                     "higher_is_better": OBJECTIVES[name][1], "cells": dict(sorted(cells.items()))}
    return out


def label(assignment: dict) -> str:
    """`models.1.parameters.weight: 0.4, merge_method: ties` -> `weight=0.4 merge_method=ties`."""
    return " ".join(f"{path.split('.')[-1]}={value}" for path, value in assignment.items()) or "(base config)"


def score(points: list[dict]) -> dict:
    """Marks each point (with `metrics` from `objectives`) `on_front`, over the objectives every point has."""
    measured = [name for name in OBJECTIVES if points and all(p["metrics"].get(name) for p in points)]
    on_front = front([[p["metrics"][name]["value"] for name in measured] for p in points],
                     [OBJECTIVES[name][1] for name in measured]) if measured else [True] * len(points)
    for point, flag in zip(points, on_front):
        point["on_front"] = flag
    return {"objectives": {name: {"measures": what, "higher_is_better": higher}
                           for name, (what, higher) in OBJECTIVES.items()},
            "front_over": measured, "front": [p["name"] for p in points if p["on_front"]]}


def _error(metric: dict):
    """Error-bar lengths below and above the value (none without an interval)."""
    low, high = metric["ci"] or (metric["value"], metric["value"])
    return [[max(0.0, metric["value"] - low)], [max(0.0, high - metric["value"])]]


def plot(points: list[dict], path) -> None:
    """ASR against helpfulness and against over-refusal, 95% intervals as error bars, front points ringed and
    labelled with their settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    x_name = "attack_success_rate"
    for ax, y_name in zip(axes, ("accuracy", "refusal_rate")):
        ax.set_xlabel(f"{OBJECTIVES[x_name][0]}, lower is better")
        ax.set_ylabel(f"{OBJECTIVES[y_name][0]}, {'higher' if OBJECTIVES[y_name][1] else 'lower'} is better")
        shown = [p for p in points if p["metrics"].get(x_name) and p["metrics"].get(y_name)]
        if not shown:
            ax.text(0.5, 0.5, "not measured by this suite", ha="center", va="center", transform=ax.transAxes)
            continue
        labels: dict[tuple[float, float], list[str]] = {}  # front points that coincide share one label
        for p in shown:
            x, y = p["metrics"][x_name], p["metrics"][y_name]
            ax.errorbar(x["value"], y["value"], xerr=_error(x), yerr=_error(y), fmt="o", capsize=3, alpha=0.8,
                        color="tab:blue" if p["on_front"] else "tab:gray")
            if p["on_front"]:
                ax.scatter([x["value"]], [y["value"]], s=160, facecolors="none", edgecolors="black", zorder=3)
                labels.setdefault((x["value"], y["value"]), []).append(p["label"])
        for xy, names in labels.items():
            ax.annotate("\n".join(names), xy, textcoords="offset points", xytext=(6, 6), fontsize=8, va="bottom")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("Merge sweep: ringed points are on the Pareto front (ASR, over-refusal, helpfulness)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
