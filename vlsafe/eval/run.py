"""`vlsafe eval`: one model, one suite -> results.json + samples.jsonl.

A suite is data (eval/suites/NAME.yaml, or a path to such a file): benchmarks, seeded sample sizes and
conditions. Every response comes through the generation cache and every verdict through the judgement cache, so
rerunning, or rerunning with a second judge, generates nothing. A text-only LLM runs the text condition only, on
the same items as its VLM, so the two compare item by item.

results.json (schema "vlsafe.eval/1", modelled on lm-evaluation-harness):
  results[benchmark][condition][metric] = {rate, k, n, ci95 (Wilson), higher_is_better, by_category}
  model {spec, fingerprint, is_vlm}, suite, config, judge {name, version}, decoding, items_sha256,
  skipped [{benchmark, condition, reason}], cache {path, hits, misses}, versions, git, date
samples.jsonl: one row per (benchmark, condition, item): prompt shown, request judged, image, response, verdicts.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

SUITE_DIR = Path(__file__).with_name("suites")
SCHEMA = "vlsafe.eval/1"
HIGHER_IS_BETTER = {"attack_success_rate": False, "refusal_rate": False, "accuracy": True}


class SuiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    benchmark: str  # a registry name, or "heldout": the image questions of a corpus given by --corpus
    sample: int | None = None  # seeded sample size; None = every item
    conditions: list[str] = ["text"]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    seed: int = 0
    max_new_tokens: int = 128
    entries: list[SuiteEntry]


def load_suite(name: str) -> tuple[str, Suite]:
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITE_DIR.glob("*.yaml")))
        raise VlsafeError(f"unknown suite {name!r} (known: {known}; or a path to a suite .yaml)")
    try:
        return path.stem, Suite.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as err:
        raise VlsafeError(f"{path}: not a valid suite ({str(err).splitlines()[0]})") from None


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


def evaluate(model: str, suite: str, out: str | Path, judge: str = "default", limit: int | None = None,
             conditions: list[str] | None = None, corpus: str | Path | None = None,
             cache_path: str | Path | None = None, batch_size: int = 16, backend: str = "hf", log=print) -> dict:
    from vlsafe.eval import benchmarks
    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate, generation_keys, model_fingerprint
    from vlsafe.eval.judges import get as get_judge
    from vlsafe.eval.metrics import answer_correct, rate
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
    judge_impl = get_judge(judge)  # before any generation: a bad judge name costs nothing
    bundle = checkpoint.load(model)
    cache = Cache(cache_path)
    decoding = Decoding(max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    results: dict = {}
    samples, skipped, item_ids = [], [], []
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
                verdicts = _judge(judge_impl, cache, keys, shown, responses)
                groups: dict[str, list] = {}
                for prompt, response, verdict in zip(shown, responses, verdicts):
                    metric = benchmarks.metric_for(prompt)
                    if metric == "accuracy":
                        flag = answer_correct(response, prompt.answer, prompt.meta.get("aliases", []))
                    else:  # an attack succeeds when the model does not refuse; a benign prompt fails when it does
                        flag = not verdict["refused"] if metric == "attack_success_rate" else verdict["refused"]
                    groups.setdefault(metric, []).append((prompt.category, flag))
                    item_ids.append(f"{entry.benchmark}/{condition}/{prompt.id}")
                    samples.append({"benchmark": entry.benchmark, "condition": condition, "id": prompt.id,
                                    "category": prompt.category, "label": prompt.label, "prompt": prompt.text,
                                    "request": prompt.meta.get("request", prompt.text), "image": prompt.image,
                                    "answer": prompt.answer, "response": response, **verdict,
                                    "metric": metric, "flag": flag})
                cell = results.setdefault(entry.benchmark, {}).setdefault(condition, {})
                for metric, flags in groups.items():
                    by_category = {}
                    for category in sorted({c for c, _ in flags}):
                        by_category[category] = rate([f for c, f in flags if c == category])
                    cell[metric] = {**rate([f for _, f in flags]), "higher_is_better": HIGHER_IS_BETTER[metric],
                                    "judge": judge_impl.name if metric != "accuracy" else "answer-match",
                                    "judge_version": judge_impl.version if metric != "accuracy" else None,
                                    "by_category": by_category}
        report = {
            "schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_hash(),
            "model": {"spec": str(model), "fingerprint": model_fingerprint(bundle), "is_vlm": bundle.is_vlm},
            "suite": {"name": suite_name, **spec.model_dump()},
            "config": {"judge": judge, "limit": limit, "conditions": conditions, "corpus": str(corpus) if corpus else None,
                       "batch_size": batch_size, "backend": backend, "seed": spec.seed},
            "judge": {"name": judge_impl.name, "version": judge_impl.version},
            "decoding": Decoding(max_new_tokens=spec.max_new_tokens, seed=spec.seed).__dict__,
            "items_sha256": hashlib.sha256("\n".join(item_ids).encode()).hexdigest(),
            "results": results, "skipped": skipped,
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
