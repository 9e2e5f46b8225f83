"""Keeping training and evaluation apart, and measuring memorised refusals.

`check` fails a build when any evaluation prompt (HarmBench, StrongREJECT, the over-refusal set, the helpfulness
set) appears in training data, exactly or as a near-duplicate (word-set Jaccard >= threshold after normalising
case and punctuation, `benchmarks.find_overlap`). A model that saw an evaluation item in training is not being
evaluated on held-out data, and its refusal rate says nothing about generalisation.

`verbatim_share` measures the other failure the scouting run showed: evaluation refusals that are word-for-word
copies of a training response (memorised strings, which flatter keyword judges).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from vlsafe.data.records import Conversation, PreferencePair, Prompt
from vlsafe.errors import VlsafeError

NEAR_DUPLICATE = 0.8


def evaluation_sets() -> dict[str, Callable[[], list[Prompt]]]:
    """Every evaluation source the project reports on; training data must hold none of their prompts."""
    from vlsafe.eval import benchmarks as b

    return {"harmbench": lambda: b.harmbench("test") + b.harmbench("val") + b.harmbench_standard(),
            "strongreject": lambda: b.strongreject() + b.strongreject(small=True),
            "overrefusal": b.overrefusal, "text_helpfulness": b.text_helpfulness}


def user_prompts(records: Iterable) -> list[Prompt]:
    """Every user turn of conversations and every prompt of preference pairs, as Prompts keyed by record id."""
    out = []
    for record in records:
        if isinstance(record, Conversation):
            users = [t.content for t in record.turns if t.role == "user"]
            out += [Prompt(id=f"{record.id}#{k}", text=text) for k, text in enumerate(users)]
        elif isinstance(record, PreferencePair):
            out.append(Prompt(id=record.id, text=record.prompt))
        elif isinstance(record, Prompt):
            out.append(record)
        else:
            raise VlsafeError(f"leakage: cannot read prompts from a {type(record).__name__}")
    return out


def find(training: list[Prompt], evaluation: dict[str, list[Prompt]] | None = None,
         threshold: float = NEAR_DUPLICATE) -> list[dict]:
    """Every (training prompt, evaluation prompt) pair that is an exact or near duplicate."""
    from vlsafe.eval.benchmarks import find_overlap

    if evaluation is None:
        evaluation = {name: load() for name, load in evaluation_sets().items()}
    by_id = {p.id: p for p in training}
    found = []
    for name, prompts in evaluation.items():
        texts = {p.id: p.text for p in prompts}
        for train_id, eval_id, similarity in find_overlap(training, prompts, threshold):
            found.append({"training_id": train_id, "evaluation_set": name, "evaluation_id": eval_id,
                          "similarity": similarity, "training": by_id[train_id].text[:120],
                          "evaluation": texts[eval_id][:120]})
    return found


def check(records: Iterable, evaluation: dict[str, list[Prompt]] | None = None,
          threshold: float = NEAR_DUPLICATE, where: str = "training data") -> dict:
    """Raises (one line, naming the first offender) if any evaluation prompt is in `records`; else a summary."""
    prompts = user_prompts(records)
    found = find(prompts, evaluation, threshold)
    if found:
        first = found[0]
        raise VlsafeError(f"{where}: {len(found)} evaluation prompt(s) leak into training, e.g. record "
                          f"{first['training_id']!r} ~ {first['evaluation_set']} {first['evaluation_id']!r} "
                          f"(similarity {first['similarity']})")
    return {"training_prompts": len(prompts), "threshold": threshold, "leaks": 0}


def drop_leaking(candidates: list[Prompt], evaluation: dict[str, list[Prompt]] | None = None,
                 threshold: float = NEAR_DUPLICATE) -> tuple[list[Prompt], list[dict]]:
    """The candidates with every near-duplicate of an evaluation prompt removed, and what was removed.

    Training sources overlap evaluation sources in the wild (AdvBench and HarmBench share behaviours), so a
    builder filters first and `check` then guards the written file."""
    found = find(candidates, evaluation, threshold)
    bad = {f["training_id"] for f in found}
    return [p for p in candidates if p.id not in bad], found


# ------------------------------------------------------------------------------------------------ memorisation
def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def duplicate_share(responses: list[str]) -> dict:
    """Share of responses that are verbatim duplicates of another response in the same list."""
    counts = Counter(_normal(r) for r in responses)
    duplicated = sum(c for c in counts.values() if c > 1)
    return {"n": len(responses), "distinct": len(counts), "duplicated": duplicated,
            "share": duplicated / len(responses) if responses else 0.0}


def verbatim_share(evaluation_responses: list[str], training_responses: Iterable[str],
                   only: list[bool] | None = None) -> dict:
    """Share of evaluation responses (those flagged by `only`, e.g. the judged refusals) that copy a training
    response verbatim (after normalising whitespace and case), with k, n and the intervals `vlsafe eval` gives."""
    from vlsafe.eval.metrics import proportion

    seen = {_normal(r) for r in training_responses}
    picked = [r for r, keep in zip(evaluation_responses, only or [True] * len(evaluation_responses)) if keep]
    return proportion([_normal(r) in seen for r in picked])


def training_responses(records: Iterable) -> list[str]:
    """Every assistant turn of conversations and every chosen response of preference pairs."""
    out = []
    for record in records:
        if isinstance(record, Conversation):
            out += [t.content for t in record.turns if t.role == "assistant"]
        elif isinstance(record, PreferencePair):
            out.append(record.chosen)
    return out


def copies_in_samples(samples: str | Path, training: list[str], judge: str | None = None) -> dict:
    """`verbatim_share` over an evaluation's samples.jsonl: of the harmful-prompt responses that `judge` (default:
    the first judge of each row) called refusals, the share that copy a training response word for word."""
    from vlsafe.data.formats._common import read_jsonl

    responses, refused, used = [], [], set()
    for line, row in read_jsonl(Path(samples)):
        verdicts = row.get("verdicts")
        if not isinstance(verdicts, dict) or "response" not in row:
            raise VlsafeError(f"{samples}: line {line}: not a row of `vlsafe eval` samples.jsonl (schema v2)")
        if row.get("label") != "harmful":
            continue
        name = judge or next(iter(verdicts))
        if name not in verdicts:
            raise VlsafeError(f"{samples}: line {line}: no verdict of judge {name!r} (has {', '.join(verdicts)})")
        used.add(name)
        responses.append(row["response"])
        refused.append(bool(verdicts[name]["refused"]))
    result = verbatim_share(responses, training, only=refused)
    return {"samples": str(samples), "judge": sorted(used), "harmful_responses": len(responses),
            "refusals": sum(refused), "copies_of_training": result}
