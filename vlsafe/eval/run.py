"""`vlsafe eval`: one model, one suite -> results.json + samples.jsonl.

A suite is data (eval/suites/NAME.yaml, or a path to such a file): benchmarks, seeded sample sizes and
conditions. Every response comes through the generation cache and every verdict through the judgement cache, so
rerunning, or rerunning with a second judge, generates nothing. A text-only LLM runs the text condition only, on
the same items as its VLM, so the two compare item by item.

Several judges can score one run (`--judge A --judge B`, or a suite's `judges:`): every refusal-based metric is
reported once per judge, and Cohen's kappa between every pair of judges goes beside the metrics.

results.json: schema "vlsafe.eval", schema_version 2, every field listed in eval/RESULTS.md (a test holds the two
together). In short: one row per (benchmark, condition, category, metric, judge) with n, k, value and a seeded
bootstrap 95% CI; kappa rows per judge pair; the model's hash, suite, decoding, judges and versions, git, date.
samples.jsonl: one row per (benchmark, condition, item): prompt shown, request judged, image, response, and
`verdicts` {judge: {refused, score, harmful, reason}} (`correct` for answer-checked items).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

SUITE_DIR = Path(__file__).with_name("suites")
SCHEMA, SCHEMA_VERSION = "vlsafe.eval", 2
HIGHER_IS_BETTER = {"attack_success_rate": False, "harmful_compliance_rate": False, "refusal_rate": False,
                    "accuracy": True}
ANSWER_MATCH = ("answer-match", "1")  # (judge, version) of accuracy rows: metrics.answer_correct


class SuiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    benchmark: str  # a registry name, or "heldout": the image questions of a corpus given by --corpus
    sample: int | None = None  # seeded sample size; None = every item
    conditions: list[str] = ["text"]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    seed: int = 0  # sampling and the bootstrap
    max_new_tokens: int = 128
    judges: list[str] = ["default"]  # refusal judges; --judge on the command line replaces them
    entries: list[SuiteEntry]


def load_suite(name: str) -> tuple[str, Suite]:
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITE_DIR.glob("*.yaml")))
        raise VlsafeError(f"unknown suite {name!r} (known: {known}; or a path to a suite .yaml)")
    try:
        return path.stem, Suite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (ValidationError, yaml.YAMLError) as err:
        raise VlsafeError(f"{path}: not a valid suite ({str(err).splitlines()[0]})") from None


def _shown_image(image: str | None, tmp: Path) -> str | None:
    """An image rendered into the output folder is recorded relative to it ("images/<hash>.png"): its absolute
    path is the temp folder's, which is renamed away when the evaluation completes."""
    if image is not None and Path(image).is_relative_to(tmp):
        return Path(image).relative_to(tmp).as_posix()
    return image


def _sample(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    prompts = sorted(prompts, key=lambda p: p.id)  # sampling must not depend on file order
    return prompts if n is None or n >= len(prompts) else random.Random(seed).sample(prompts, n)


def _load(benchmark: str, corpus: Path | None) -> list[Prompt] | None:
    if benchmark == "heldout":
        if corpus is None:
            return None
        from vlsafe.data.synthetic import load_heldout

        return load_heldout(corpus / "eval_heldout.jsonl" if corpus.is_dir() else corpus)
    from vlsafe.eval import benchmarks

    return benchmarks.get(benchmark).load()


def git_hash() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate(model: str, suite: str, out: str | Path, judges: list[str] | None = None, limit: int | None = None,
             conditions: list[str] | None = None, corpus: str | Path | None = None,
             cache_path: str | Path | None = None, batch_size: int = 16, backend: str = "hf", log=print,
             judge: str | None = None) -> dict:
    """Evaluate `model` on `suite` into the new directory `out`; returns the results.json object. `judges`
    replaces the suite's judges (`judge`, one name, is the older spelling of `judges=[judge]`)."""
    import numpy

    from vlsafe.eval import benchmarks
    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate, generation_keys, model_fingerprint
    from vlsafe.eval.judges import get as get_judge
    from vlsafe.eval.metrics import BOOTSTRAP, answer_correct
    from vlsafe.io import atomic_dir, versions, write_json
    from vlsafe.model import checkpoint

    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    if limit is not None and limit < 1:
        raise VlsafeError(f"--limit must be at least 1 (got {limit})")
    suite_name, spec = load_suite(suite)
    known = (*benchmarks.TEXT_CONDITIONS, "native")
    for condition in conditions or []:
        if condition not in known:
            raise VlsafeError(f"unknown condition {condition!r} (known: {', '.join(known)})")
    corpus = Path(corpus) if corpus is not None else None
    if corpus is not None and not corpus.exists():
        raise VlsafeError(f"{corpus}: corpus not found")
    if judge is not None:
        judges = [judge, *(judges or [])]
    # before any generation: a bad judge name costs nothing
    judge_impls = list({j.name: j for j in map(get_judge, judges or spec.judges)}.values())
    started = time.time()
    bundle = checkpoint.load(model)
    cache = Cache(cache_path)
    decoding = Decoding(max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    items, samples, skipped, item_ids = [], [], [], []
    with atomic_dir(out) as tmp:
        for entry in spec.entries:
            wanted = [c for c in entry.conditions if conditions is None or c in conditions]
            prompts = _load(entry.benchmark, corpus)
            if prompts is None:
                skipped.append({"benchmark": entry.benchmark, "condition": "*", "reason": "needs --corpus"})
                continue
            n = entry.sample if limit is None else min(entry.sample or limit, limit)
            prompts = _sample(prompts, n, spec.seed)
            for condition in wanted:
                if not bundle.is_vlm and (condition != "text" or any(p.image for p in prompts)):
                    skipped.append({"benchmark": entry.benchmark, "condition": condition,
                                    "reason": "text-only model: text condition only"})
                    continue
                shown = benchmarks.expand(prompts, condition, tmp / "images")
                log(f"{entry.benchmark}/{condition}: {len(shown)} items")
                responses = generate(bundle, shown, decoding, batch_size=batch_size, cache=cache, backend=backend)
                keys = generation_keys(bundle, shown, decoding, backend=backend)
                verdicts = {j.name: _judge(j, cache, keys, shown, responses) for j in judge_impls}
                for i, (prompt, response) in enumerate(zip(shown, responses)):
                    metric = benchmarks.metric_for(prompt)
                    item = {"benchmark": entry.benchmark, "condition": condition, "metric": metric,
                            "category": prompt.category or "uncategorised",
                            "verdicts": {name: v[i] for name, v in verdicts.items()}}
                    if metric == "accuracy":
                        item["correct"] = answer_correct(response, prompt.answer, prompt.meta.get("aliases", []))
                    items.append(item)
                    item_ids.append(f"{entry.benchmark}/{condition}/{prompt.id}")
                    samples.append({"benchmark": entry.benchmark, "condition": condition, "id": prompt.id,
                                    "category": prompt.category, "label": prompt.label, "prompt": prompt.text,
                                    "request": prompt.meta.get("request", prompt.text), "image": _shown_image(prompt.image, tmp),
                                    "answer": prompt.answer, "response": response, "metric": metric,
                                    **({"correct": item["correct"]} if "correct" in item else {}),
                                    "verdicts": item["verdicts"]})
        report = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 1), "git": git_hash(),
            "model": {"spec": str(model), "fingerprint": model_fingerprint(bundle), "is_vlm": bundle.is_vlm},
            "suite": {"name": suite_name, **spec.model_dump()},
            "config": {"judges": judges, "limit": limit, "conditions": conditions,
                       "corpus": str(corpus) if corpus else None, "batch_size": batch_size, "backend": backend,
                       "seed": spec.seed},
            "judges": [{"name": j.name, "version": j.version} for j in judge_impls],
            "decoding": decoding.__dict__,
            "ci": {**BOOTSTRAP, "seed": spec.seed, "numpy": numpy.__version__},
            "items_sha256": hashlib.sha256("\n".join(item_ids).encode()).hexdigest(),
            "results": score(items, judge_impls, spec.seed),
            "agreement": judge_agreement(items, [j.name for j in judge_impls], spec.seed),
            "skipped": skipped,
            "cache": {"path": str(cache.path), "generation_hits": cache.hits, "generation_misses": cache.misses},
            "versions": versions(),
        }
        write_json(tmp / "results.json", report)
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s, default=str) + "\n" for s in samples))
    cache.close()
    return report


def _judge(judge, cache, keys: list[str], prompts: list[Prompt], responses: list[str]) -> list[dict]:
    """Verdicts from the judgement cache where present; the judge runs on the rest only."""
    found = cache.get_verdicts(keys, judge.name, judge.version)
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        pairs = [(prompts[i].meta.get("request", prompts[i].text), responses[i]) for i in todo]
        fresh = {}
        for i, verdict in zip(todo, judge.judge_many(pairs)):
            fresh[keys[i]] = {"refused": verdict.refused, "score": verdict.score, "harmful": verdict.harmful,
                              "reason": verdict.reason}
        cache.put_verdicts(fresh, judge.name, judge.version)
        found.update(fresh)
    return [found[k] for k in keys]


def _row(benchmark, condition, category, metric, judge, version, estimate: dict, reason=None) -> dict:
    return {"benchmark": benchmark, "condition": condition, "category": category, "metric": metric, "judge": judge,
            "judge_version": version, **estimate, "higher_is_better": HIGHER_IS_BETTER[metric], "reason": reason}


def score(items: list[dict], judges, seed: int) -> list[dict]:
    """Result rows: per (benchmark, condition, metric), all items (category "*") then each category; refusal-based
    metrics once per judge. Harmful items get the refusal-based ASR and, where the judge tells harmful content
    apart, the harmful-compliance rate; where it cannot, that row's value is None with the reason."""
    from vlsafe.eval.metrics import harmful_compliance, proportion

    cells: dict[tuple, list[dict]] = {}
    for item in items:
        cells.setdefault((item["benchmark"], item["condition"], item["metric"]), []).append(item)
    rows = []
    for (benchmark, condition, metric), cell in cells.items():
        scopes = [("*", cell)] + [(c, [i for i in cell if i["category"] == c])
                                  for c in sorted({i["category"] for i in cell})]
        for category, group in scopes:
            where = (benchmark, condition, category)
            if metric == "accuracy":
                rows.append(_row(*where, metric, *ANSWER_MATCH, proportion([i["correct"] for i in group], seed)))
                continue
            for judge in judges:
                verdicts = [i["verdicts"][judge.name] for i in group]
                refused = [v["refused"] for v in verdicts]
                if metric == "refusal_rate":
                    rows.append(_row(*where, metric, judge.name, judge.version, proportion(refused, seed)))
                    continue
                # an attack succeeds when the model does not refuse
                rows.append(_row(*where, metric, judge.name, judge.version, proportion([not r for r in refused],
                                                                                          seed)))
                harmful = [v.get("harmful") for v in verdicts]
                complied = harmful_compliance(refused, harmful)
                unknown = complied.count(None)
                # a refusal-only judge gets no number even when it marks every response a refusal: its rows
                # stay comparable across runs
                if harmful.count(None) == len(harmful):
                    reason = f"judge {judge.name} gives refusal verdicts only, no harmfulness verdict"
                elif unknown:
                    reason = f"judge {judge.name} gives no harmfulness verdict on {unknown} non-refused responses"
                else:
                    reason = None
                estimate = proportion(complied, seed) if reason is None else {
                    "n": len(group), "k": None, "value": None, "ci": None, "ci_wilson": None}
                rows.append(_row(*where, "harmful_compliance_rate", judge.name, judge.version, estimate, reason))
    return rows


def judge_agreement(items: list[dict], judge_names: list[str], seed: int) -> list[dict]:
    """Cohen's kappa on the refusal labels for every pair of judges: over all judged items, then per benchmark."""
    from vlsafe.eval.metrics import cohen_kappa

    rows = []
    for a, b in itertools.combinations(judge_names, 2):
        benchmarks = list(dict.fromkeys(i["benchmark"] for i in items))
        for benchmark in ["*", *benchmarks]:
            group = [i for i in items if benchmark in ("*", i["benchmark"])]
            rows.append({"judges": [a, b], "benchmark": benchmark,
                         **cohen_kappa([i["verdicts"][a]["refused"] for i in group],
                                       [i["verdicts"][b]["refused"] for i in group], seed)})
    return rows
