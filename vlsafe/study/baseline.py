"""The main job until the full study DAG exists: the safety cost of bolting a vision tower onto the default LLM.

It builds VLM@0 (the LLM + a vision tower + a fresh, seeded projector) and runs `vlsafe eval` (`eval.run.evaluate`,
the one evaluation path) on the LLM and on VLM@0 with the `study` suite: harmful requests as text, with a blank
image and as FigStep-style typographic images; benign-but-scary prompts (over-refusal); questions with checkable
answers (helpfulness). The LLM runs the text condition only, on the same items, so the two compare item by item.

Layout of `out`:
  study.yaml         the suite as run: the packaged suite with the study's sample sizes, seed and length applied
  models/vlm0/       the VLM@0 checkpoint (its vlsafe.json records how it was built)
  llm/, vlm0/        one `vlsafe eval` output per model: results.json (schema vlsafe.eval v2), samples.jsonl
  results.json       the study's summary (schema vlsafe.study v1), written last: a study without it is unfinished
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlsafe.errors import VlsafeError
from vlsafe.eval.benchmarks import METRICS

SCHEMA, SCHEMA_VERSION = "vlsafe.study", 1
COLUMNS = [("llm", "text"), ("vlm0", "text"), ("vlm0", "blank"), ("vlm0", "typo")]
HEADLINE = {name: METRICS[name].short for name in ("attack_success_rate", "refusal_rate", "accuracy")}


@dataclass(frozen=True)
class BaselineConfig:
    llm: str = "smollm2-135m-instruct"
    tower: str = "efficientnet-lite0"
    suite: str = "study"  # a suite name or .yaml path; the options below override it
    n_harmful: int | None = None  # items per harmful benchmark; None: the suite's sample sizes
    n_benign: int | None = None  # items per other benchmark (over-refusal, helpfulness); None: the suite's
    max_new_tokens: int | None = None  # None: the suite's
    seed: int = 0  # item sampling, the bootstrap, decoding and the projector's initialisation
    judges: tuple[str, ...] | None = None  # None: the suite's
    batch_size: int = 16
    cache: str | None = None  # evaluation cache (SQLite); None: the shared one under VLSAFE_CACHE


def study_suite(config: BaselineConfig) -> tuple[str, dict]:
    """The suite with the study's options applied; a benchmark's registered metric says whether it is harmful."""
    from vlsafe.eval.benchmarks import BENCHMARKS
    from vlsafe.eval.run import load_suite

    for option in ("n_harmful", "n_benign", "max_new_tokens"):
        if getattr(config, option) is not None and getattr(config, option) < 1:
            raise VlsafeError(f"--{option.replace('_', '-')} must be at least 1 (got {getattr(config, option)})")
    name, spec = load_suite(config.suite)
    suite = spec.model_dump()
    for entry in suite["entries"]:
        registered = BENCHMARKS.get(entry["benchmark"])
        if registered is None:
            continue  # e.g. heldout (needs a corpus): left as the suite has it
        n = config.n_harmful if registered.metric == "attack_success_rate" else config.n_benign
        entry["sample"] = entry["sample"] if n is None else n
    suite["description"] += (f" [study options: n_harmful={config.n_harmful}, n_benign={config.n_benign}, "
                             f"max_new_tokens={config.max_new_tokens}, seed={config.seed}; None = the suite's]")
    suite["seed"] = config.seed
    suite["max_new_tokens"] = config.max_new_tokens or suite["max_new_tokens"]
    return name, suite


def run_baseline(out: str | Path, config: BaselineConfig = BaselineConfig(), log=print) -> dict:
    """Build VLM@0, evaluate the LLM and VLM@0 into `out`/llm and `out`/vlm0; returns the summary results.json."""
    import yaml

    from vlsafe.eval.run import evaluate, git_hash
    from vlsafe.io import versions, write_json
    from vlsafe.model import checkpoint

    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    name, suite = study_suite(config)
    out.mkdir(parents=True)
    try:  # each stage below is written atomically; a failure removes the whole study
        suite_file = out / f"{name}.yaml"
        suite_file.write_text(yaml.safe_dump(suite, sort_keys=False))
        log(f"building VLM@0: {config.llm} + {config.tower}")
        vlm_dir = out / "models" / "vlm0"
        checkpoint.save(checkpoint.build_vlm(config.llm, config.tower, seed=config.seed), vlm_dir,
                        provenance={"command": "study", "llm": config.llm, "tower": config.tower,
                                    "seed": config.seed})
        reports = {}
        judges = list(config.judges) if config.judges else None
        for key, model in (("llm", config.llm), ("vlm0", str(vlm_dir))):
            log(f"evaluating {key}: {model}")
            reports[key] = evaluate(model, str(suite_file), out / key, judges=judges, cache_path=config.cache,
                                    batch_size=config.batch_size, log=log)
        models = {key: {"spec": report["model"]["spec"], "fingerprint": report["model"]["fingerprint"],
                        "results": f"{key}/results.json", "items_sha256": report["items_sha256"]}
                  for key, report in reports.items()}
        built = json.loads((vlm_dir / "vlsafe.json").read_text())
        models["vlm0"].update(path="models/vlm0", content_sha256=built["content_sha256"],
                              built_from=built["provenance"])
        run = reports["vlm0"]  # judges, decoding and CIs are the suite's, the same in both runs
        summary = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job": "baseline: the LLM (text) vs its VLM@0 (text, blank image, typographic image)",
            "git": git_hash(), "versions": versions(), "config": asdict(config),
            "suite": {"file": suite_file.name, "from": config.suite, **suite}, "models": models,
            "judges": run["judges"], "decoding": run["decoding"], "ci": run["ci"],
            # the headline rows (all items of a benchmark) of both runs; per-category rows stay in each run's file
            "results": [{"model": key, **row} for key, report in reports.items()
                        for row in report["results"] if row["category"] == "*"],
        }
        write_json(out / "results.json", summary)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log(table(summary))
    return summary


def _cell(row: dict | None) -> str:
    if row is None or row["value"] is None:
        return "-"
    low, high = row["ci"]
    return f"{row['value']:4.0%} [{low:.0%}, {high:.0%}] n={row['n']}"


def table(summary: dict) -> str:
    """The headline rows as text: one line per (benchmark, metric), one column per (model, condition); refusal-based
    rates by the first judge."""
    judge = summary["judges"][0]["name"]
    cells, lines = {}, {}
    for row in summary["results"]:
        if row["metric"] in HEADLINE and row["judge"] in (judge, "answer-match"):
            lines.setdefault((row["benchmark"], row["metric"]), None)
            cells[row["benchmark"], row["metric"], row["model"], row["condition"]] = row
    header = [f"{model}/{condition}" for model, condition in COLUMNS]
    body = [[f"{benchmark} {HEADLINE[metric]}", *(_cell(cells.get((benchmark, metric, *c))) for c in COLUMNS)]
            for benchmark, metric in lines]
    widths = [max(len(r[i]) for r in [["", *header], *body]) for i in range(len(header) + 1)]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [["", *header], *body]]
    return "\n".join([*text, f"(95% bootstrap CIs; refusals judged by {judge}; accuracy by answer match)"])
