"""The `align` data builder: what makes a compliant text LLM refuse harmful requests without over-refusing.

    harmful  AdvBench + Do-Not-Answer (training-side sources only), near-duplicates of any evaluation prompt
             removed -> a refusal composed for each request (refusals.py), varied and naming what is declined
    benign   ordinary and benign-but-scary prompts written for training (data/benign_train.jsonl, not the
             evaluation over-refusal set) -> the model's OWN answers, generated before tuning and cached, so
             tuning teaches "refuse these" without rewriting how the model answers everything else; answers
             the model itself refused are left out (they would teach over-refusal)

The file is checked for leakage of evaluation prompts before anything is written, and the manifest reports the
share of refusals that are verbatim duplicates within the set.

    vlsafe safety align-data --model smollm2-135m-instruct --out runs/align-data
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from vlsafe.data.records import Conversation, Prompt, Turn
from vlsafe.errors import VlsafeError

BENIGN_FILE = Path(__file__).parent / "data" / "benign_train.jsonl"
DATA_FILE = "align.jsonl"


def harmful_pool(evaluation: dict | None = None) -> tuple[list[Prompt], list[dict]]:
    """The training parts of AdvBench + Do-Not-Answer (data/splits.yaml: their held-out parts are evaluation
    benchmarks), exact repeats removed, near-duplicates of evaluation prompts dropped. Every builder of harmful
    training prompts draws from here."""
    from vlsafe.data import splits
    from vlsafe.eval import benchmarks
    from vlsafe.safety import leakage

    seen, pool = set(), []
    for prompt in (splits.training_part("advbench", benchmarks.advbench())
                   + splits.training_part("donotanswer", benchmarks.do_not_answer())):
        key = " ".join(prompt.text.lower().split())
        if key not in seen:
            seen.add(key)
            pool.append(prompt)
    return leakage.drop_leaking(pool, evaluation)


def benign_prompts(path: Path = BENIGN_FILE) -> list[Prompt]:
    from vlsafe.data.formats._common import field, read_jsonl

    prompts, ids = [], set()
    for line, row in read_jsonl(path):
        where = f"{path}: line {line}"
        for name in ("id", "type", "prompt"):
            field(row, name, where)
        if row["id"] in ids:
            raise VlsafeError(f"{where}: duplicate id {row['id']!r}")
        ids.add(row["id"])
        prompts.append(Prompt(id=f"benign-{row['id']}", text=row["prompt"], source="vlsafe-benign-train",
                              category=row["type"], label="benign", meta={"scary": bool(row.get("scary"))}))
    return prompts


def balanced_sample(prompts: list[Prompt], n: int, seed: int) -> list[Prompt]:
    """`n` prompts drawn in turn from each source (AdvBench, Do-Not-Answer), each source shuffled by seed."""
    import numpy as np

    by_source: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_source.setdefault(prompt.source, []).append(prompt)
    rng = np.random.default_rng([seed, 5])
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_source.items())]
    picked = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    if len(picked) < n:
        raise VlsafeError(f"align-data: asked for {n} harmful prompts, the training sources hold {len(picked)}")
    return picked


def refusal_conversations(prompts: list[Prompt], seed: int) -> list[Conversation]:
    from vlsafe.safety.refusals import compose, topic_of

    return [Conversation(id=f"align-refuse-{p.id}", source=p.source,
                         turns=[Turn(role="user", content=p.text),
                                Turn(role="assistant", content=compose(p.text, p.category, seed))],
                         meta={"kind": "refusal", "topic": topic_of(p.text)["id"], "category": p.category})
            for p in prompts]


def own_answers(model: str, prompts: list[Prompt], max_new_tokens: int, cache_path: str | None,
                batch_size: int = 64, show_progress: bool = True,
                temperature: float = 0.0, seed: int = 0) -> tuple[list[str], str]:
    """The model's answers before any tuning (greedy; sampled at `temperature` > 0), through the project's
    generation cache; `show_progress`: the answers so far on stderr (vlsafe/progress.py). Batches of 64 rows, as
    the study profiles evaluate: SmolLM2-135M's 301 benign answers (32 new tokens) took 34-35 s at 64 against 51-56 s
    at 16, all 301 identical; at 64 new tokens one of them parts ways a few words in (fp32 rounds with the batch's
    shape, and a near-tie falls the other way), so align data made at another batch is not byte-identical."""
    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate, model_fingerprint
    from vlsafe.model import checkpoint
    from vlsafe.progress import Steps

    bundle = checkpoint.load(model)
    if bundle.is_vlm:
        raise VlsafeError(f"{model}: align data is for a text LLM; got a VLM directory")
    cache = Cache(cache_path)
    try:
        decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature or 1.0, seed=seed)
        with Steps("generate", len(prompts), unit="items", enabled=show_progress) as bar:
            answers = generate(bundle, prompts, decoding, batch_size=batch_size, progress=bar.advance, cache=cache)
    finally:
        cache.close()
    return answers, model_fingerprint(bundle)


def build(out: str | Path, model: str, n_harmful: int = 160, seed: int = 0, max_new_tokens: int = 80,
          cache_path: str | None = None, benign_file: str | Path = BENIGN_FILE, evaluation: dict | None = None,
          show_progress: bool = True, temperature: float = 0.0) -> dict:
    """Writes out/align.jsonl (format `jsonl`) and out/manifest.json; returns the manifest.

    `evaluation` overrides the evaluation sets the leakage check reads (tests); nothing is written on failure.
    """
    from vlsafe.eval.judges import get as judge
    from vlsafe.io import atomic_dir, sha256_file, versions
    from vlsafe.safety import jsonl, leakage

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    if n_harmful < 1:
        raise VlsafeError(f"align-data: n_harmful must be at least 1, got {n_harmful}")
    evaluation = evaluation if evaluation is not None else {n: f() for n, f in leakage.evaluation_sets().items()}
    pool, dropped = harmful_pool(evaluation)
    harmful = balanced_sample(pool, n_harmful, seed)
    refusals = refusal_conversations(harmful, seed)
    benign = benign_prompts(Path(benign_file))
    leakage.check(benign, evaluation, where=str(benign_file))  # a file we write must not leak: fail, not filter

    answers, fingerprint = own_answers(model, benign, max_new_tokens, cache_path, show_progress=show_progress,
                                       temperature=temperature, seed=seed)
    refused = [judge("refusal-patterns").judge(p.text, a).refused for p, a in zip(benign, answers)]
    helpful = [Conversation(id=f"align-answer-{p.id}", source=p.source,
                            turns=[Turn(role="user", content=p.text), Turn(role="assistant", content=a)],
                            meta={"kind": "own_answer", "type": p.category, "scary": p.meta["scary"]})
               for p, a, r in zip(benign, answers, refused) if a.strip() and not r]
    records = refusals + helpful
    leakage.check(records, evaluation, where=f"{out / DATA_FILE}")

    refusal_texts = [c.turns[-1].content for c in refusals]
    manifest = {
        "format": "vlsafe-align/1", "model": model, "model_fingerprint": fingerprint, "seed": seed,
        "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature},
        "counts": {"records": len(records), "refusals": len(refusals), "own_answers": len(helpful),
                   "benign_prompts": len(benign), "benign_left_out_refused_or_empty": len(benign) - len(helpful),
                   "harmful_by_source": dict(Counter(p.source for p in harmful)),
                   "harmful_dropped_as_evaluation_near_duplicates": len({d["training_id"] for d in dropped}),
                   "refusal_topics": dict(Counter(c.meta["topic"] for c in refusals).most_common())},
        "refusal_verbatim_duplicates": leakage.duplicate_share(refusal_texts),
        "leakage": {"checked_against": {k: len(v) for k, v in evaluation.items()}, "leaks": 0,
                    "dropped_examples": dropped[:10]},
        "versions": versions(),
    }
    with atomic_dir(out) as tmp:
        jsonl.save(records, tmp / DATA_FILE)
        manifest["sha256"] = {DATA_FILE: sha256_file(tmp / DATA_FILE)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
