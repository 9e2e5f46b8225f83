"""How the SFT stages pick their records: refusal variety checked (align, safety-sft), and mixing (full, mixed).

A safety set whose refusals are all one string teaches the model to emit that string, not to refuse: the
keyword judges then count the memorised string as safety. So such a set is bad input (exit 2).

`mixed` keeps the ratio exact without repeating anything: with T task and S safety records and ratio r, it
takes every task record and r/(1-r)*T safety records when there are that many, otherwise every safety record
and (1-r)/r*S task records, each drawn by seed. r = 0 is stage 2 alone, r = 1 the safety data alone.

Text-only instruction data (files of role `text`, e.g. ShareGPT-style conversations as in LLaVA-665K) is mixed into
the task data of `full` and `mixed` the same way, at `text_ratio` of the task data, before any safety mixing.
"""

from __future__ import annotations

import numpy as np

from vlsafe.data.records import Conversation
from vlsafe.errors import VlsafeError

REFUSAL_KINDS = {"unsafe", "harmful_image"}  # VLGuard instructions answered by refusals


def refusals(records: list[Conversation]) -> list[str]:
    """The refusal answers of a safety set: marked by its meta (VLGuard kinds, vlsafe's kind="refusal"), or, in a
    file without such marks, every final answer the pattern judge calls a refusal."""
    marked = [r for r in records if "instruction_kind" in r.meta or "kind" in r.meta]
    if marked:
        return [r.turns[-1].content for r in marked
                if r.meta.get("instruction_kind") in REFUSAL_KINDS or r.meta.get("kind") == "refusal"]
    from vlsafe.eval.judges import get

    judge = get("refusal-patterns")
    found = []
    for record in records:
        user = next(t.content for t in record.turns if t.role == "user")
        answer = record.turns[-1].content
        if judge.judge(user, answer).refused:
            found.append(answer)
    return found


def check_refusals(records: list[Conversation], where: str) -> dict:
    texts = refusals(records)
    distinct = {" ".join(t.lower().split()) for t in texts}
    if len(texts) >= 2 and len(distinct) == 1:
        raise VlsafeError(f"{where}: all {len(texts)} refusals are the same string ({texts[0][:60]!r}); a model "
                          "trained on it memorises a string instead of learning to refuse (vary them: "
                          "`vlsafe safety vlguard-like` / `align-data` compose them)")
    return {"refusals": len(texts), "distinct_refusals": len(distinct)}


def select_checked(config, per_file: list[list], specs) -> tuple[list, dict]:
    """Every record of every file; the refusals of each file checked for variety."""
    info = [check_refusals(part, spec.path) for part, spec in zip(per_file, specs)]
    return [r for part in per_file for r in part], {"files": info}


def mix_counts(n_task: int, n_safety: int, ratio: float) -> tuple[int, int]:
    """(task, safety) counts at exactly `ratio` safety, using as much data as possible without repeats."""
    if not 0.0 <= ratio <= 1.0:
        raise VlsafeError(f"mix_ratio must be within [0, 1], got {ratio}")
    if ratio == 0.0:
        return n_task, 0
    if ratio == 1.0:
        return 0, n_safety
    want_safety = round(ratio / (1 - ratio) * n_task)
    if want_safety <= n_safety:
        return n_task, want_safety
    return round((1 - ratio) / ratio * n_safety), n_safety


def mix(main: list, extra: list, ratio: float, seed: int, salt: int) -> tuple[list, int, int]:
    """`main` and `extra` records at exactly `ratio` extra, nothing repeated, drawn and shuffled by seed."""
    n_main, n_extra = mix_counts(len(main), len(extra), ratio)
    rng = np.random.default_rng([seed, salt])
    chosen = [main[i] for i in rng.permutation(len(main))[:n_main]]
    chosen += [extra[i] for i in rng.permutation(len(extra))[:n_extra]]
    return [chosen[i] for i in rng.permutation(len(chosen))], n_main, n_extra


def _task_records(config, per_file: list[list], specs) -> tuple[list, dict[str, int]]:
    """The task (stage-2) records, with the `text` files mixed in at `text_ratio`; counts taken of each role."""
    task = [r for part, spec in zip(per_file, specs) if spec.role == "task" for r in part]
    text = [r for part, spec in zip(per_file, specs) if spec.role == "text" for r in part]
    if config.text_ratio is None:
        return task, {"task": len(task)}
    if any(r.image for r in text):
        where = next(spec.path for part, spec in zip(per_file, specs) if spec.role == "text" and
                     any(r.image for r in part))
        raise VlsafeError(f"{where}: a data file of role 'text' holds records with images")
    mixed, n_task, n_text = mix(task, text, config.text_ratio, config.seed, salt=11)
    return mixed, {"task": n_task, "text": n_text}


def select_task(config, per_file: list[list], specs) -> tuple[list, dict]:
    """Stage `full`: every task record, with text-only data mixed in at `text_ratio` when set."""
    records, counts = _task_records(config, per_file, specs)
    return records, {"files": [{"mixed_in": counts[spec.role]} if config.text_ratio is not None else {}
                               for spec in specs]}


def select_mixed(config, per_file: list[list], specs) -> tuple[list, dict]:
    task, counts = _task_records(config, per_file, specs)
    safety = [r for part, spec in zip(per_file, specs) if spec.role == "safety" for r in part]
    info = [check_refusals(part, spec.path) if spec.role == "safety" else {}
            for part, spec in zip(per_file, specs)]
    if not safety:
        raise VlsafeError("stage 'mixed': the safety data files hold no records")
    mixed, n_task, n_safety = mix(task, safety, config.mix_ratio, config.seed, salt=7)
    counts = {**counts, "safety": n_safety}
    if config.text_ratio is None:
        counts["task"] = n_task
    for entry, spec in zip(info, specs):
        entry["mixed_in"] = counts[spec.role]
    return mixed, {"files": info}
