"""`vlsafe report RUN_DIR`: results.json, report.md, report.html and plots/ from a study folder, finished or not.

Everything here is read from the study's own files: plan.json (what should exist), each finished stage's
stage.json (lineage), each eval's results.json and samples.jsonl (numbers, examples, claims), legibility.json and
analysis.json. A stage whose stage.json key differs from plan.json's is stale and left out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlsafe.errors import VlsafeError

SCHEMA, SCHEMA_VERSION = "vlsafe.study", 2
HEADLINE = ("attack_success_rate", "refusal_rate", "non_answer_rate", "accuracy")


def _read(path: Path):
    return json.loads(path.read_text())


def collect(out: Path) -> dict:
    """The study's files gathered into one object (the input of every renderer)."""
    from vlsafe.study.claims import item_outcomes, read_samples

    out = Path(out)
    if not (out / "plan.json").is_file():
        raise VlsafeError(f"{out}: not a study folder (no plan.json; run `vlsafe study --out {out}` first)")
    plan = _read(out / "plan.json")
    keys = {s["name"]: s["key"] for s in plan["stages"]}
    records = {}
    for name, key in keys.items():
        path = out / "stages" / name / "stage.json"
        if path.is_file():
            record = _read(path)
            if record.get("key") == key:
                records[name] = record
    models, outcomes = {}, {}
    for name, model in plan["models"].items():
        record = records.get(f"eval-{name}")
        if record is None or "eval" not in record["outputs"]:  # not run yet, or its model was never made
            continue
        folder = out / record["outputs"]["eval"]
        results = _read(folder / "results.json")
        samples = read_samples(folder / "samples.jsonl")
        judge = results["judges"][0]["name"] if results["judges"] else None
        outcomes[name] = item_outcomes(samples, judge)
        models[name] = {**model, "results": results, "samples": samples, "judge": judge}
    legibility = {n: _read(out / r["outputs"]["legibility"]) for n, r in records.items()
                  if r["kind"] == "legibility"}
    analysis = None
    if "analysis" in records:
        analysis = _read(out / records["analysis"]["outputs"]["analysis"])
    failed = _read(out / "failed.json") if (out / "failed.json").is_file() else None
    return {"out": out, "plan": plan, "records": records, "models": models, "outcomes": outcomes,
            "legibility": legibility, "analysis": analysis, "failed": failed}


def role_of(name: str) -> str:
    """adapted-s1 -> adapted; merge-linear-dpo-0.3-s0 -> merge-linear-dpo-0.3; checkpoints have no role."""
    if "-step" in name:
        return ""
    base, _, seed = name.rpartition("-s")
    return base if base and seed.isdigit() else name


def grouped(outcomes: dict, seeds: dict | None = None) -> dict[str, dict]:
    """role -> {seed: item outcomes} (seed None for a model no seed trained), the claims' input: keyed by seed so
    that two roles are paired seed with seed."""
    groups: dict[str, dict] = {}
    for name in sorted(outcomes):
        role = role_of(name)
        if role:
            seed = None  # a name without a seed (aligned, vlm1) is one model that every seed shares
            if role != name:  # adapted-s1: the plan's seed, else the name's
                seed = (seeds or {}).get(name)
                seed = int(name.rpartition("-s")[2]) if seed is None else seed
            groups.setdefault(role, {})[seed] = outcomes[name]
    return groups


def model_table(data: dict) -> list[dict]:
    """One row per model: the headline cells (all items, first judge; accuracy by answer match) with n and CI,
    and the non-answer share of each harmful and benign cell beside."""
    rows = []
    for name, model in data["models"].items():
        cells = []
        for row in model["results"]["results"]:
            if row["category"] != "*" or row["metric"] not in HEADLINE:
                continue
            if row["metric"] != "accuracy" and row["judge"] != model["judge"]:
                continue
            # the items the cell's rate counts (a benchmark may mix harmful and benign items); none for the
            # non-answer cell itself, which needs no non-answer share beside it
            items = [o for (b, c, _), o in data["outcomes"][name].items()
                     if b == row["benchmark"] and c == row["condition"] and o["metric"] == row["metric"]]
            non_answer = sum(o["non_answer"] for o in items) / len(items) if items else None
            cells.append({"benchmark": row["benchmark"], "condition": row["condition"], "metric": row["metric"],
                          "value": row["value"], "ci": row["ci"], "n": row["n"], "k": row["k"],
                          "non_answer": non_answer})
        rows.append({"model": name, "role": model["role"], "seed": model.get("seed"), "step": model.get("step"),
                     "judge": model["judge"], "fingerprint": model["results"]["model"]["fingerprint"],
                     "cells": cells})
    return rows


def seed_spread(models: list[dict]) -> dict:
    """role -> the headline cells of a role trained with several seeds: mean over seeds, their standard deviation
    and each seed's value. The model table keeps one row per model and seed (a reader can see each run); this is
    the spread beside it, the variation that the item intervals of one run do not show."""
    import statistics

    by_role: dict[str, dict[tuple, dict]] = {}
    for model in models:
        role, seed = role_of(model["model"]), model.get("seed")
        if not role or role == model["model"] or seed is None:  # checkpoints and models no seed trained
            continue
        for c in model["cells"]:
            if c["value"] is not None:
                key = (c["benchmark"], c["condition"], c["metric"])
                by_role.setdefault(role, {}).setdefault(key, {})[seed] = c["value"]
    out = {}
    for role, cells in sorted(by_role.items()):
        rows = [{"benchmark": b, "condition": c, "metric": m, "mean": round(statistics.fmean(v.values()), 6),
                 "sd": round(statistics.stdev(v.values()), 6), "seeds": len(v),
                 "per_seed": {str(k): v[k] for k in sorted(v)}}
                for (b, c, m), v in cells.items() if len(v) > 1]
        if rows:
            out[role] = rows
    return out


def dynamics(data: dict) -> dict:
    """Per seed: ASR (harmful benchmarks pooled) and over-refusal per condition along stage 2's steps, from VLM@1
    (step 0) through the checkpoints to the adapted model."""
    from vlsafe.eval.metrics import proportion

    curves = {}
    for name, model in data["models"].items():
        step = model.get("step")
        if step is None or not (name == "vlm1" or name.startswith("adapted-")):
            continue
        seeds = [model["seed"]] if model.get("seed") is not None else sorted(
            {m["seed"] for m in data["models"].values() if m.get("seed") is not None})
        for seed in seeds:
            for (bench, condition, _), o in data["outcomes"][name].items():
                if o["metric"] not in ("attack_success_rate", "refusal_rate"):
                    continue
                key = (seed, o["metric"], condition)
                curves.setdefault(key, {}).setdefault(step, []).append(o["attack"] if o["metric"] ==
                                                                       "attack_success_rate" else o["refusal"])
    out = {}
    for (seed, metric, condition), steps in sorted(curves.items()):
        out.setdefault(f"s{seed}", {}).setdefault(metric, {})[condition] = [
            {"step": step, **proportion(flags, seed)} for step, flags in sorted(steps.items())]
    return out


def heldout(data: dict) -> dict:
    """Held-out image questions per question type, with the chance level of guessing among each item's answer
    choices beside them: an adapted VLM near chance is measuring fine-tuning noise, not vision."""
    record = data["records"].get("corpus")
    items = data["out"] / record["outputs"]["corpus"] / "eval_heldout.jsonl" if record else None
    if items is None or not items.is_file():
        return {}
    odds: dict[str, list[float]] = {}
    for line in items.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            choices = (row.get("meta") or {}).get("choices") or []
            if choices:
                odds.setdefault(row["category"], []).append(1 / len(choices))
    chance = {task: round(sum(v) / len(v), 4) for task, v in sorted(odds.items())}
    models = {}
    for name, model in data["models"].items():
        cells = {r["category"]: {"value": r["value"], "ci": r["ci"], "n": r["n"]} for r in model["results"]["results"]
                 if r["benchmark"] == "heldout" and r["metric"] == "accuracy"}
        if cells:
            models[name] = cells
    return {"chance": chance, "models": models, "spread": _heldout_spread(data, models)}


def _heldout_spread(data: dict, models: dict) -> dict:
    """role -> question type -> mean, sd and count over the training seeds (roles with two seeds or more)."""
    import statistics

    values: dict[str, dict[str, list[float]]] = {}
    for name, cells in models.items():
        role = role_of(name)
        if not role or role == name or data["models"][name].get("seed") is None:
            continue
        for task, c in cells.items():
            if c["value"] is not None:
                values.setdefault(role, {}).setdefault(task, []).append(c["value"])
    return {role: {task: {"mean": round(statistics.fmean(v), 6), "sd": round(statistics.stdev(v), 6),
                          "seeds": len(v)} for task, v in tasks.items() if len(v) > 1}
            for role, tasks in sorted(values.items()) if any(len(v) > 1 for v in tasks.values())}


def lineage(data: dict) -> list[dict]:
    rows = []
    for name, record in data["records"].items():
        outputs = record.get("outputs", {})
        content = None
        if "model" in outputs:
            meta = data["out"] / outputs["model"] / "vlsafe.json"
            if meta.is_file():
                content = _read(meta).get("content_sha256")
        judges = outputs.get("judges")
        rows.append({"stage": name, "kind": record["kind"], "inputs": record["inputs"], "key": record["key"][:16],
                     "command": record.get("command", ""), "seconds": record.get("seconds"),
                     "model_sha256": content, "files": record.get("files", []), "models": record.get("models", []),
                     "judges": judges})
    return rows


def examples(data: dict, per_cell: int = 2) -> list[dict]:
    rows = []
    for name, model in data["models"].items():
        if "-step" in name:
            continue
        seen: dict[tuple, int] = {}
        for sample in model["samples"]:
            cell = (sample["benchmark"], sample["condition"])
            if seen.get(cell, 0) >= per_cell:
                continue
            seen[cell] = seen.get(cell, 0) + 1
            verdict = (sample.get("verdicts") or {}).get(model["judge"], {})
            rows.append({"model": name, "benchmark": sample["benchmark"], "condition": sample["condition"],
                         "request": sample.get("request") or sample.get("prompt"), "response": sample["response"],
                         "verdict": verdict.get("verdict") or ("refusal" if verdict.get("refused") else "compliance")})
    return rows


def machines(records: dict) -> list[dict]:
    """The machines the finished stages ran on, each with its stage count and summed seconds, in all and by stage
    kind (train, eval, ...): a study's wall time means little without the CPU that took it (a resumed run may span
    two), and where it went is what a faster study would change."""
    from vlsafe.io import machine_label

    found: dict[str, dict] = {}
    for record in records.values():
        entry = found.setdefault(machine_label(record.get("machine")), {"stages": 0, "seconds": 0.0, "by_kind": {}})
        seconds = record.get("seconds") or 0.0
        entry["stages"] += 1
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
        kind = record.get("kind") or "other"
        entry["by_kind"][kind] = round(entry["by_kind"].get(kind, 0.0) + seconds, 2)
    return [{"machine": label, **entry} for label, entry in sorted(found.items())]


def run_commit(out: Path, records: dict) -> str | list[str] | None:
    """The git commit(s) the finished stages ran at: stage.json's `git`, or, for stages written before it was
    recorded, the `git` of their evaluations' results.json."""
    commits = {r["git"] for r in records.values() if r.get("git")}
    if not commits:
        for path in (out / "stages").glob("*/*/results.json"):
            commit = json.loads(path.read_text()).get("git")
            if commit:
                commits.add(commit)
    commits = sorted(commits)
    return commits[0] if len(commits) == 1 else (commits or None)


def _relative(path: str | None) -> str | None:
    """A config path as the project names it (configs/studies/X.yaml), not the folder it happened to run in."""
    if not path:
        return path
    parts = Path(path).parts
    return str(Path(*parts[parts.index("configs"):])) if "configs" in parts else path


def _write_text(path: Path, text: str) -> None:
    """Through a temp file and a rename, like `vlsafe.io.write_json`: the old content or the new, never a mix."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(out: str | Path, summary_path: str | Path | None = None) -> dict:
    """Writes OUT/results.json, report.md, report.html and plots/; returns the results.json object."""
    from vlsafe.eval.run import git_hash
    from vlsafe.io import versions, write_json
    from vlsafe.report import html, markdown, plots
    from vlsafe.study import claims as claims_module

    out = Path(out)
    data = collect(out)
    perceived = bool(data["legibility"]) and all(r.get("perceived") for r in data["legibility"].values())
    config = {}
    if (out / "study.yaml").is_file():
        import yaml

        config = yaml.safe_load((out / "study.yaml").read_text()) or {}
    seeds = {name: model.get("seed") for name, model in data["models"].items()}
    claims = claims_module.compute(grouped(data["outcomes"], seeds), perceived, data["analysis"],
                                   config.get("margin", 0.05))
    planned = [s["name"] for s in data["plan"]["stages"]]
    results = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # the commit that computed the stages (not the one rebuilding the report); several if the run spans commits
        "git": run_commit(out, data["records"]), "report_git": git_hash(), "versions": versions(), "config": config,
        "config_file": _relative(data["plan"].get("config")),
        "complete": all(n in data["records"] for n in planned), "failed": data["failed"],
        "stages_done": len(data["records"]), "stages_planned": len(planned),
        "seconds_by_stage": {n: r.get("seconds") for n, r in data["records"].items()},
        "machines": machines(data["records"]),
        # evaluations that generated nothing (every answer came from the cache, e.g. re-scored after a judge or
        # matcher change): their seconds are judging time only, not what a first run takes
        "answers_from_cache": sorted(f"eval-{n}" for n, m in data["models"].items()
                                     if m["results"].get("cache", {}).get("generation_hits")
                                     and not m["results"]["cache"].get("generation_misses")),
        # the precision the evaluations generated in (their decoding's dtype): greedy answers depend on it
        "eval_dtypes": sorted({m["results"].get("decoding", {}).get("dtype", "fp32") for m in data["models"].values()}),
        "claims": claims,
        "models": (table := model_table(data)),
        "seed_spread": seed_spread(table),
        "dynamics": dynamics(data),
        "heldout": heldout(data),
        "legibility": {n: {k: v for k, v in r.items() if k != "examples"} for n, r in data["legibility"].items()},
        "typo_perceived": perceived,
        "judges": sorted({m["judge"] for m in data["models"].values() if m["judge"]}),
        "lineage": lineage(data),
        "examples": examples(data),
    }
    plot_files = plots.render_all(results, data, out / "plots")
    # each file whole or absent, and results.json last: a study is finished once results.json exists, so a kill
    # while writing the report cannot leave a finished-looking run with a half-written report beside it
    _write_text(out / "report.md", markdown.render(results, plot_files, out))
    _write_text(out / "report.html", html.render(results, plot_files))
    write_json(out / "results.json", results)
    if summary_path is not None:
        from vlsafe.report.readme import write_summary

        write_summary(results, summary_path)
    return results
