"""The report's plots (matplotlib, Agg): safety dynamics along stage 2, the Pareto front of remedies and merges,
and the layer-analysis heatmaps copied from the analysis stage."""

from __future__ import annotations

import shutil
from pathlib import Path

LABELS = {"attack_success_rate": "ASR (harmful requests answered)", "refusal_rate": "over-refusal (benign refused)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dynamics(results: dict, path: Path) -> Path | None:
    curves = results["dynamics"]
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("attack_success_rate", "refusal_rate")):
        for seed, by_metric in curves.items():
            for condition, points in by_metric.get(metric, {}).items():
                steps = [p["step"] for p in points]
                values = [p["value"] for p in points]
                low = [p["value"] - p["ci"][0] if p["ci"] else 0 for p in points]
                high = [p["ci"][1] - p["value"] if p["ci"] else 0 for p in points]
                ax.errorbar(steps, values, yerr=[low, high], marker="o", capsize=3, label=f"{condition} ({seed})")
        ax.set_xlabel("stage-2 step (0 = after stage 1)")
        ax.set_ylabel(LABELS[metric])
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Safety dynamics during VL adaptation (95% bootstrap intervals)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto(results: dict, path: Path) -> Path | None:
    f4 = next((c for c in results["claims"] if c["id"] == "F4"), {})
    points = f4.get("points")
    if not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, other in zip(axes, ("accuracy", "refusal_rate")):
        for name, p in points.items():
            if p.get("attack_success_rate") is None or p.get(other) is None:
                continue
            merge = name.startswith("merge-")
            ax.scatter([p["attack_success_rate"]], [p[other]], marker="o" if merge else "s", s=60,
                       color="tab:blue" if merge else "tab:red", edgecolors="black" if p["on_front"] else "none")
            ax.annotate(name.replace("merge-", ""), (p["attack_success_rate"], p[other]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("ASR, lower is better")
        ax.set_ylabel("helpfulness (accuracy), higher is better" if other == "accuracy"
                      else "over-refusal, lower is better")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("Remedies (red squares) and merges (blue circles); outlined: on the Pareto front")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def asr_by_model(results: dict, path: Path) -> Path | None:
    rows = [(m["model"], c) for m in results["models"] if m["step"] is None or m["model"] in ("vlm1",)
            for c in m["cells"] if c["metric"] == "attack_success_rate" and c["condition"] == "text"
            and c["value"] is not None]
    if not rows:
        return None
    pooled: dict[str, list[int]] = {}
    for model, cell in rows:
        k, n = pooled.get(model, [0, 0])
        pooled[model] = [k + cell["k"], n + cell["n"]]
    plt = _plt()
    names = list(pooled)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4), constrained_layout=True)
    ax.bar(range(len(names)), [k / n for k, n in pooled.values()], color="tab:gray")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("text ASR (harmful benchmarks pooled)")
    ax.set_ylim(0, 1)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_all(results: dict, data: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = {"dynamics": dynamics(results, folder / "dynamics.png"), "pareto": pareto(results, folder / "pareto.png"),
            "asr": asr_by_model(results, folder / "asr_by_model.png")}
    if "analysis" in data["records"]:  # the analysis stage's own heatmaps
        source = data["out"] / data["records"]["analysis"]["outputs"]["folder"]
        for png in sorted(source.glob("*/*.png")):  # each part's figures (not the rendered prompt images)
            target = folder / f"analysis-{png.parent.name}-{png.name}"
            shutil.copy2(png, target)
            made[f"analysis: {png.stem}"] = target
    return {k: v for k, v in made.items() if v is not None}
