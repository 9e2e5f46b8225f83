"""Judges: read (prompt, response) rows, add `verdict` (refusal | compliance | non_answer), `refused` and `score`.

  base       Verdict, text helpers, the non-answer rules every judge shares
  patterns   `refusal-patterns`, transparent: refusal phrases in the opening sentences
  learned    `default` and `refusal-minilm`: sentence-level features on MiniLM embeddings, fitted by `train`
  llm        `llm:TEMPLATE:BACKEND`: a judge model behind a pinned prompt template
  labelled   the human-labelled rows the learned judges are fitted and measured on
  train      `vlsafe judge train`
The judge modules import `base` only; this registry imports them lazily, so no import circle remains.
"""

from __future__ import annotations

import functools
from pathlib import Path

from vlsafe.errors import VlsafeError
from vlsafe.eval.judges.base import VERDICTS, Verdict, clauses, normalise, opening_sentences  # noqa: F401
from vlsafe.eval.judges.patterns import PatternJudge


def _learned(variant: str):
    def make():
        from vlsafe.eval.judges.learned import LearnedJudge  # loads MiniLM: only when asked for

        return LearnedJudge(variant)

    return make


# name -> factory. `default` is the best offline judge measured (see judge_data/CARD.md); LLM judges are named
# `llm:TEMPLATE:BACKEND` and a directory written by `vlsafe judge train --out DIR` is a judge too.
JUDGES = {PatternJudge.name: PatternJudge, "default": _learned("default"),
          "refusal-minilm": _learned("refusal-minilm")}


@functools.cache
def get(name: str):
    if name in JUDGES:
        return JUDGES[name]()
    if name.startswith("llm:"):
        template, _, backend = name[4:].partition(":")
        if not backend:
            raise VlsafeError(f"judge {name!r}: expected llm:TEMPLATE:BACKEND (a URL or a model spec)")
        from vlsafe.eval.judges.llm import LlmJudge

        return LlmJudge(template, backend)
    if Path(name).is_dir():
        from vlsafe.eval.judges.learned import LearnedJudge

        judge = LearnedJudge("default", name)
        judge.name = f"trained:{name}"
        return judge
    raise VlsafeError(f"unknown judge {name!r} (known: {', '.join(sorted(JUDGES))}, llm:TEMPLATE:BACKEND, "
                      "or a directory from `vlsafe judge train --out`)")


def judge_rows(rows: list[dict], judge_name: str = "default", where: str = "input") -> list[dict]:
    for n, row in enumerate(rows, 1):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str):
                raise VlsafeError(f"{where}, row {n}: field {field!r} missing or not a string")
    judge = get(judge_name)
    verdicts = judge.judge_many([(row["prompt"], row["response"]) for row in rows])
    out = []
    for row, verdict in zip(rows, verdicts):
        extra = {} if verdict.harmful is None else {"harmful": verdict.harmful}
        out.append({**row, "verdict": verdict.verdict, "refused": verdict.refused, "score": verdict.score, **extra,
                    "judge": judge.name, "judge_version": judge.version})
    return out
