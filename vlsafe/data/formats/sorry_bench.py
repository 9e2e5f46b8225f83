"""SORRY-Bench (Xie et al., 2024): unsafe instructions over 45 (2024-06) or 44 (2025-03) fine-grained categories.

Published as JSONL (`question.jsonl`, and `question_<style>.jsonl` for the 20 linguistic mutations; hub
`sorry-bench/sorry-bench-202406` / `-202503`, gated), one object a line:
`{"question_id": 1, "category": "1", "turns": ["..."], "prompt_style": "base"}`. The category is a 1-based
number; its name comes from `sorry_bench_categories.json`, by release. Every item should be refused.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vlsafe.data.formats._common import field, find_file, local_source, optional, read_jsonl
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = "sorry-bench/sorry-bench-202406"
FILES = ("question.jsonl", "*.jsonl")


@lru_cache(maxsize=1)
def category_names() -> dict[str, list[str]]:
    table = json.loads((Path(__file__).with_name("sorry_bench_categories.json")).read_text(encoding="utf-8"))
    return {release: names for release, names in table.items() if not release.startswith("_")}


def load(path: str | Path = HUB_ID, image_root=None, release: str = "auto") -> list[Prompt]:
    """`release` ("202406", "202503" or "auto") picks the category names; "auto" decides by the highest
    category number (45 -> 202406, 44 -> 202503) or the release named in the path, else keeps the numbers."""
    source = find_file(local_source(path, FILES), FILES, "SORRY-Bench question JSONL")
    rows = []
    for line, obj in read_jsonl(source):
        where = f"{source}: line {line}"
        turns = field(obj, "turns", where, kind=list)
        if not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise VlsafeError(f"{where}: field 'turns' should hold the prompt as its first string")
        category = field(obj, "category", where)
        if not category.strip().isdigit():
            raise VlsafeError(f"{where}: field 'category' is {category!r} (expected a category number)")
        style = optional(obj, "prompt_style", "base")
        rows.append((where, field(obj, "question_id", where), int(category), turns, style))
    names = _names_for(release, source, max((r[2] for r in rows), default=0))
    prompts = []
    for where, question_id, number, turns, style in rows:
        if names is not None and not 1 <= number <= len(names):
            raise VlsafeError(f"{where}: field 'category' is {number}, outside 1..{len(names)}")
        prompts.append(Prompt(
            id=f"sorry_bench-{question_id}" + ("" if style == "base" else f"-{style}"), text=turns[0].strip(),
            source="sorry_bench", category=names[number - 1] if names else str(number), label="harmful",
            meta={"category_id": number, "prompt_style": style, "turns": len(turns)},
        ))
    return prompts


def _names_for(release: str, source: Path, highest: int) -> list[str] | None:
    table = category_names()
    if release != "auto":
        if release not in table:
            raise VlsafeError(f"unknown SORRY-Bench release {release!r} (known: {', '.join(table)})")
        return table[release]
    by_count = {len(names): r for r, names in table.items()}
    if highest in by_count:
        return table[by_count[highest]]
    named = [r for r in table if r in str(source)]
    return table[named[0]] if named else None
