"""Keeping training and evaluation apart, and measuring memorised refusals.

`check` fails a build when any evaluation prompt (the evaluation sources of data/splits.yaml: HarmBench,
StrongREJECT, the over-refusal set, the helpfulness set, the held-out parts of AdvBench and Do-Not-Answer)
appears in training data, exactly or as a near-duplicate by either of two measures:

  words      word-set Jaccard >= 0.8 after normalising case and punctuation (`benchmarks.find_overlap`): copies
             and light edits
  embedding  all-MiniLM-L6-v2 cosine >= 0.76: same request, other words ("What does 'extortion' mean?" vs
             "What does the word "extortion" mean?", which share too few words for the first measure)

The cosine threshold was chosen on labelled pairs written for it (safety/data/paraphrase_pairs.jsonl: 50
paraphrases of one request, 50 hard negatives that share topic and words but ask something else, e.g. a bomb vs a
bath bomb): the lowest threshold whose precision is at least 0.8. On those pairs it has precision 0.80 and recall
0.56, and word overlap finds none of the 50 paraphrases (tests/test_leakage.py recomputes all three). MiniLM
embeds topic more than intent, so the hard negatives it confuses are same-topic requests; a builder drops such
candidates (cheap), and a file the project writes must be worded far enough from every evaluation prompt.
A model that saw an evaluation item in training is not being evaluated on held-out data, and its refusal rate
says nothing about generalisation.

`verbatim_share` measures the other failure the scouting run showed: evaluation refusals that are word-for-word
copies of a training response (memorised strings, which flatter keyword judges).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from vlsafe.data.records import Conversation, PreferencePair, Prompt
from vlsafe.errors import VlsafeError

NEAR_DUPLICATE = 0.8  # word-set Jaccard
SAME_MEANING = 0.76  # MiniLM cosine, chosen on paraphrase_pairs.jsonl (see above)
PARAPHRASE_PAIRS = Path(__file__).parent / "data" / "paraphrase_pairs.jsonl"


def evaluation_sets() -> dict[str, Callable[[], list[Prompt]]]:
    """Every evaluation source declared in data/splits.yaml; training data must hold none of their prompts.
    HarmBench and StrongREJECT count with every split and subset the project can evaluate."""
    from vlsafe.data import splits
    from vlsafe.eval import benchmarks as b

    whole = {"harmbench": lambda: b.harmbench("test") + b.harmbench("val") + b.harmbench_standard(),
             "strongreject": lambda: b.strongreject() + b.strongreject(small=True)}
    return {name: whole.get(name, b.get(name).load) for name in splits.evaluation_names()}


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


def same_meaning(prompts: list[Prompt], others: list[Prompt], threshold: float = SAME_MEANING
                 ) -> list[tuple[str, str, float]]:
    """(id, other id, cosine) for every pair whose MiniLM embeddings are at least `threshold` apart in cosine."""
    import numpy as np

    from vlsafe.eval.embed import embedder

    if not prompts or not others:
        return []
    left = embedder().encode([p.text for p in prompts])
    right = embedder().encode([p.text for p in others])
    cosine = left @ right.T
    rows, cols = np.nonzero(cosine >= threshold)
    return [(prompts[i].id, others[j].id, round(float(cosine[i, j]), 3)) for i, j in zip(rows, cols)]


def find(training: list[Prompt], evaluation: dict[str, list[Prompt]] | None = None,
         threshold: float = NEAR_DUPLICATE, cosine: float | None = SAME_MEANING) -> list[dict]:
    """Every (training prompt, evaluation prompt) pair that is a duplicate by word overlap (`similarity`, Jaccard)
    or by meaning (`cosine`, when not None); `check` names which caught it."""
    from vlsafe.eval.benchmarks import find_overlap

    if evaluation is None:
        evaluation = {name: load() for name, load in evaluation_sets().items()}
    by_id = {p.id: p for p in training}
    found = []
    for name, prompts in evaluation.items():
        texts = {p.id: p.text for p in prompts}
        hits: dict[tuple[str, str], dict] = {}
        for train_id, eval_id, similarity in find_overlap(training, prompts, threshold):
            hits[train_id, eval_id] = {"check": "words", "similarity": similarity, "cosine": None}
        for train_id, eval_id, value in (same_meaning(training, prompts, cosine) if cosine is not None else []):
            hit = hits.setdefault((train_id, eval_id), {"check": "embedding", "similarity": None})
            hit["cosine"] = value
            if hit["check"] == "words":
                hit["check"] = "words+embedding"
        for (train_id, eval_id), hit in hits.items():
            found.append({"training_id": train_id, "evaluation_set": name, "evaluation_id": eval_id, **hit,
                          "training": by_id[train_id].text[:120], "evaluation": texts[eval_id][:120]})
    return found


def check(records: Iterable, evaluation: dict[str, list[Prompt]] | None = None,
          threshold: float = NEAR_DUPLICATE, where: str = "training data", cosine: float | None = SAME_MEANING
          ) -> dict:
    """Raises (one line, naming the first offender) if any evaluation prompt is in `records`; else a summary."""
    prompts = user_prompts(records)
    found = find(prompts, evaluation, threshold, cosine)
    if found:
        first = max(found, key=lambda f: (f["similarity"] or 0, f["cosine"] or 0))
        measure = (f"word overlap {first['similarity']}" if first["similarity"] is not None
                   else f"embedding cosine {first['cosine']}")
        raise VlsafeError(f"{where}: {len(found)} evaluation prompt(s) leak into training, e.g. record "
                          f"{first['training_id']!r} ~ {first['evaluation_set']} {first['evaluation_id']!r} "
                          f"({measure})")
    return {"training_prompts": len(prompts), "threshold": threshold, "cosine": cosine, "leaks": 0}


def drop_leaking(candidates: list[Prompt], evaluation: dict[str, list[Prompt]] | None = None,
                 threshold: float = NEAR_DUPLICATE, cosine: float | None = SAME_MEANING
                 ) -> tuple[list[Prompt], list[dict]]:
    """The candidates with every near-duplicate of an evaluation prompt removed, and what was removed.

    Training sources overlap evaluation sources in the wild (AdvBench and HarmBench share behaviours), so a
    builder filters first and `check` then guards the written file."""
    found = find(candidates, evaluation, threshold, cosine)
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
