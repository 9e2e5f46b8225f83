"""`vlsafe judge train`: fit the learned refusal judges and measure them on data they were not fitted on.

Measured three ways, written into the card beside the weights:
  by source     fit on two of (pyrit, pyrit_extra, vlsafe), test on the third: the closest stand-in for
                human-labelled data the project has never seen
  held-out      fit on pyrit + 75% of the project's set, test on the other 25% (split by id hash, fixed)
  pattern       the pattern judge on the same rows, for comparison
The saved classifier is then fitted on all rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from vlsafe.errors import VlsafeError
from vlsafe.eval import labelled
from vlsafe.eval.learned_judge import CLASSIFIER_FILE, RELEVANCE_FLOOR, VARIANTS, fit, predict

SOURCES = ("pyrit", "pyrit_extra", "vlsafe")


def heldout(row) -> bool:
    """The project's fixed held-out quarter: by a hash of the id, so adding rows never reshuffles old ones."""
    return row.source == "vlsafe" and int(hashlib.sha256(row.id.encode()).hexdigest(), 16) % 4 == 0


def _accuracy(model, rows, embedder) -> dict:
    pairs = [(r.prompt, r.response) for r in rows]
    y = np.array([r.refused for r in rows])
    out = {}
    for variant in VARIANTS:
        predicted = predict(model, variant, pairs, embedder) >= 0.5
        out[variant] = round(float((predicted == y).mean()), 4)
    return out


def _pattern_accuracy(rows) -> float:
    from vlsafe.eval.judges import PatternJudge

    judge = PatternJudge()
    return round(float(np.mean([judge.judge(r.prompt, r.response).refused == r.refused for r in rows])), 4)


def evaluate(rows, embedder, seed: int = 0) -> dict:
    report = {"by_source": {}, "heldout": {}}
    for source in SOURCES:
        train = [r for r in rows if r.source != source]
        test = [r for r in rows if r.source == source]
        if train and test:
            report["by_source"][source] = {"n": len(test), **_accuracy(fit(train, embedder, seed), test, embedder),
                                           "refusal-patterns": _pattern_accuracy(test)}
    test = [r for r in rows if heldout(r)]
    train = [r for r in rows if not heldout(r)]
    if test:
        report["heldout"] = {"n": len(test), **_accuracy(fit(train, embedder, seed), test, embedder),
                             "refusal-patterns": _pattern_accuracy(test)}
    return report


def train(out: str | Path | None = None, seed: int = 0, log=print) -> dict:
    """Fit on all labelled rows and write <out>/refusal_classifier.json + CARD.md (default: the packaged file)."""
    from vlsafe.eval.embed import embedder as get_embedder
    from vlsafe.io import atomic_dir, versions

    target = Path(out) if out is not None else CLASSIFIER_FILE.parent
    rows = labelled.all_rows()
    embedder = get_embedder()
    log(f"embedding and fitting on {len(rows)} labelled rows (embeddings are cached after the first run)")
    measured = evaluate(rows, embedder, seed)
    model = fit(rows, embedder, seed)
    model.update({
        "embedder": embedder.version, "seed": seed, "n": len(rows), "relevance_floor": RELEVANCE_FLOOR,
        "data": {s: sum(r.source == s for r in rows) for s in SOURCES},
        "data_sha256": {"vlsafe": labelled.PROJECT_SHA256},
        "measured": measured, "versions": {k: v for k, v in versions().items() if k in ("python", "vlsafe")},
    })
    text = json.dumps(model, indent=1) + "\n"
    card = _card(model)
    if out is None:  # refresh the packaged files in place (two files, each written atomically)
        for name, content in ((CLASSIFIER_FILE.name, text), ("CARD.md", card)):
            tmp = target / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(target / name)
    else:
        if target.exists() and any(target.iterdir()):
            raise VlsafeError(f"{target}: output path exists (choose a new one)")
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / CLASSIFIER_FILE.name).write_text(text)
            (tmp / "CARD.md").write_text(card)
    log(card)
    return model


def _card(model: dict) -> str:
    m = model["measured"]
    lines = ["# Refusal classifier (vlsafe learned judges)", "",
             f"Trained {time.strftime('%Y-%m-%d')} by `vlsafe judge train` (seed {model['seed']}) on {model['n']} "
             f"labelled rows: {model['data']}. Embedder all-MiniLM-L6-v2 ({model['embedder']}).",
             "Refusal = full or partial refusal, or a response that does not serve the request (non-sequitur).", "",
             "## Accuracy on rows the classifier was not fitted on", "",
             "| test set | n | default | refusal-minilm | refusal-patterns |", "|---|---|---|---|---|"]
    for source, row in m["by_source"].items():
        lines.append(f"| {source} (fit on the other sources) | {row['n']} | {row['default']:.3f} | "
                     f"{row['refusal-minilm']:.3f} | {row['refusal-patterns']:.3f} |")
    if m["heldout"]:
        h = m["heldout"]
        lines.append(f"| vlsafe held-out quarter | {h['n']} | {h['default']:.3f} | {h['refusal-minilm']:.3f} | "
                     f"{h['refusal-patterns']:.3f} |")
    lines += ["", "Caveats: the pattern list was extended while reading the vlsafe rows, so numbers on them are "
              "optimistic. The pyrit rows are the fairer stand-in for unseen human labels, but not untouched: "
              "their pattern-judge misses were read while designing the features, and the relevance floor "
              f"({model.get('relevance_floor')}) was set by hand. Expect lower agreement on new data.", ""]
    return "\n".join(lines)
