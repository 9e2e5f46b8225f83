"""`vlsafe judge train`: fit the learned refusal judges and measure them on data they were not fitted on.

Every row is predicted by a model fitted without the row's whole source (leave-one-source-out: a source is one
model family's style of answering, or one of pyrit's files), the closest stand-in for the responses of a model the
judge has never seen; the same predictions are then read per source and per style. Agreement is reported on
`refused` (refusal vs not, what human refusal labels measure) and on the three-way verdict; the pattern judge is
measured on the same rows for comparison. The saved classifier is then fitted on all rows.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from vlsafe.errors import VlsafeError
from vlsafe.eval.judges import labelled
from vlsafe.eval.judges.base import VERDICTS
from vlsafe.eval.judges.learned import CLASSIFIER_FILE, VARIANTS, fit, verdicts
from vlsafe.eval.judges.patterns import PatternJudge


def _predict_held_out(rows, embedder, key, seed: int) -> dict[str, list[str]]:
    """Per variant, the verdict of every row from a model fitted on the rows with another `key`."""
    out = {v: [""] * len(rows) for v in VARIANTS}
    for group in sorted({key(r) for r in rows}):
        test = [i for i, r in enumerate(rows) if key(r) == group]
        train = [r for r in rows if key(r) != group]
        if len({r.refused for r in train}) < 2:
            continue
        model = fit(train, embedder, seed)
        for variant in VARIANTS:
            found = verdicts(model, variant, [(rows[i].prompt, rows[i].response) for i in test], embedder)
            for i, v in zip(test, found):
                out[variant][i] = v.verdict
    return out


def _agreement(rows, predicted: dict[str, list[str]], key) -> dict:
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[key(r)].append(i)
    report = {}
    for group, index in sorted(groups.items()):
        cell = {"n": len(index)}
        for judge, said in predicted.items():
            said = [said[i] for i in index]
            if "" in said:
                continue
            cell[judge] = round(float(np.mean([(s == "refusal") == rows[i].refused for s, i in zip(said, index)])), 4)
            cell[f"{judge} 3-way"] = round(float(np.mean([s == rows[i].verdict for s, i in zip(said, index)])), 4)
        report[group] = cell
    return report


def _kappa3(samples: np.ndarray) -> np.ndarray:
    """Cohen's kappa over three verdicts per resample; samples: (resamples, n, 2) verdict codes 0..2."""
    a, b = samples[..., 0], samples[..., 1]
    observed = (a == b).mean(1)
    chance = sum((a == v).mean(1) * (b == v).mean(1) for v in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chance < 1, (observed - chance) / (1 - chance), np.nan)


def judge_kappa(first: list[str], second: list[str], seed: int = 0) -> dict:
    """How far two judges agree beyond chance on the same rows: kappa on `refused` (metrics.cohen_kappa) and on
    the three-way verdict, each with a seeded percentile bootstrap interval over rows."""
    from vlsafe.eval.metrics import bootstrap_ci, cohen_kappa

    binary = cohen_kappa([s == "refusal" for s in first], [s == "refusal" for s in second], seed)
    codes = np.array([[VERDICTS.index(x), VERDICTS.index(y)] for x, y in zip(first, second)], dtype=np.float64)
    kappa3 = float(_kappa3(codes[None])[0]) if len(codes) else float("nan")
    return {"n": binary["n"], "kappa": binary["kappa"], "kappa_ci": binary["ci"],
            "kappa_3way": None if np.isnan(kappa3) else round(kappa3, 4),
            "kappa_3way_ci": bootstrap_ci(codes, _kappa3, seed=seed) if len(codes) else None}


def evaluate(rows, embedder, seed: int = 0) -> dict:
    patterns = PatternJudge()
    pattern_said = [patterns.judge(r.prompt, r.response).verdict for r in rows]
    said = {**_predict_held_out(rows, embedder, lambda r: r.source, seed), "refusal-patterns": pattern_said}
    return {"leave_one_source_out": {"by_source": _agreement(rows, said, lambda r: r.source),
                                     "by_style": _agreement(rows, said, lambda r: r.style),
                                     "all": _agreement(rows, said, lambda r: "*")["*"]},
            # the second opinion: how often the transparent judge and the default agree on held-out rows
            "default_vs_patterns": judge_kappa(said["default"], pattern_said, seed)}


def train(out: str | Path | None = None, seed: int = 0, log=print) -> dict:
    """Fit on all labelled rows and write <out>/refusal_classifier.json + CARD.md (default: the packaged file)."""
    from vlsafe.eval.embed import embedder as get_embedder
    from vlsafe.io import atomic_dir, versions

    target = Path(out) if out is not None else CLASSIFIER_FILE.parent
    if out is not None and target.exists() and any(target.iterdir()):
        raise VlsafeError(f"{target}: output path exists (choose a new one)")
    rows = labelled.all_rows()
    embedder = get_embedder()
    log(f"embedding and fitting on {len(rows)} labelled rows (embeddings are cached after the first run)")
    measured = evaluate(rows, embedder, seed)
    model = fit(rows, embedder, seed)
    count = lambda field: dict(sorted(Counter(getattr(r, field) for r in rows).items()))  # noqa: E731
    model.update({
        "embedder": embedder.version, "seed": seed, "n": len(rows), "data": count("source"),
        "styles": count("style"), "verdicts": count("verdict"),
        "data_sha256": {"vlsafe": labelled.PROJECT_SHA256},
        "measured": measured, "versions": {k: v for k, v in versions().items() if k in ("python", "vlsafe")},
    })
    text = json.dumps(model, indent=1) + "\n"
    card = _card(model, CARD_NOTES.read_text() if CARD_NOTES.is_file() else "")
    if out is None:  # refresh the packaged files in place (two files, each written atomically)
        for name, content in ((CLASSIFIER_FILE.name, text), ("CARD.md", card)):
            tmp = target / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(target / name)
    else:
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / CLASSIFIER_FILE.name).write_text(text)
            (tmp / "CARD.md").write_text(card)
    log(card)
    return model


CARD_NOTES = CLASSIFIER_FILE.with_name("CARD_NOTES.md")  # how the data was made: written by hand, kept in the card


def _table(title: str, cells: dict, judges: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| rows | n | " + " | ".join(judges) + " |", "|---|---|" + "---|" * len(judges)]
    for group, cell in cells.items():
        lines.append(f"| {group} | {cell['n']} | " + " | ".join(
            "-" if j not in cell else f"{cell[j]:.3f}" for j in judges) + " |")
    return lines + [""]


def _card(model: dict, notes: str) -> str:
    m = model["measured"]
    judges = ["default", "default 3-way", "refusal-minilm", "refusal-patterns", "refusal-patterns 3-way"]
    loso = m["leave_one_source_out"]
    lines = ["# Refusal classifier (vlsafe learned judges)", "",
             f"Trained {time.strftime('%Y-%m-%d')} by `vlsafe judge train` (seed {model['seed']}) on {model['n']} "
             f"labelled rows. Embedder all-MiniLM-L6-v2 ({model['embedder']}). Off-topic threshold (relevance "
             f"cosine, chosen on the labelled rows): {model['off_topic_below']}.", "",
             f"Sources: {model['data']}.", f"Verdicts: {model['verdicts']}.", f"Styles: {model['styles']}.", "",
             "## Agreement with the labels on rows the classifier was not fitted on", "",
             "Columns without `3-way` compare `refused` (refusal vs not); `3-way` compares the full verdict. "
             f"All rows, leave-one-source-out: default {loso['all']['default']:.3f} "
             f"(3-way {loso['all']['default 3-way']:.3f}), refusal-patterns {loso['all']['refusal-patterns']:.3f}.",
             ""]
    k = m.get("default_vs_patterns")
    if k:
        ci = lambda c: "n/a" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
        lines += [f"The two judges on the same held-out rows (n={k['n']}): Cohen's kappa on `refused` "
                  f"{k['kappa']:.3f} {ci(k['kappa_ci'])}, three-way kappa {k['kappa_3way']:.3f} "
                  f"{ci(k['kappa_3way_ci'])} (seeded percentile bootstrap over rows, 95%).", ""]
    lines += _table("Leave-one-source-out, per source", loso["by_source"], judges)
    lines += _table("Leave-one-source-out, per style", loso["by_style"], judges)
    return "\n".join(lines) + ("\n" + notes if notes else "")
