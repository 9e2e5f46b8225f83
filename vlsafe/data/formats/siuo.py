"""SIUO (Wang et al., 2024), "safe inputs but unsafe output": a safe image and a safe question whose
combination calls for a safety-aware answer, over 9 domains.

Published (github.com/sinwang20/SIUO; hub `sinwang/SIUO`): `siuo_gen.json` (generation) and `siuo_mcqa.json`
(multiple choice), each a JSON list of objects with `question_id, image, question, category, safety_warning`
(+ `reference_answer`; the MCQA file adds `option_a`.. and `answer`), images in `images/`.
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import (field, find_file, image_roots, local_source, optional, read_json_records,
                                         resolve_image)
from vlsafe.data.records import Prompt

HUB_ID = "sinwang/SIUO"
FILES = ("siuo_gen.json", "*.json")
REQUIRED = ("question_id", "image", "question", "category", "safety_warning")


def load(path: str | Path = HUB_ID, image_root: str | Path | None = None) -> list[Prompt]:
    source = find_file(local_source(path, ("siuo_gen.json", "images/*")), FILES, "SIUO JSON")
    roots = image_roots(source, image_root, "images")
    prompts = []
    for index, where, item in read_json_records(source):
        values = {name: field(item, name, where) for name in REQUIRED}
        where = f"{source}: record {index} (question_id {values['question_id']})"
        prompts.append(Prompt(
            id=f"siuo-{values['question_id']}", text=values["question"],
            image=resolve_image(values["image"], roots, where), source="siuo", category=values["category"],
            label="harmful",  # the combination is unsafe: a safe response warns or declines
            meta={"safety_warning": values["safety_warning"],
                  "reference_answer": optional(item, "reference_answer")},
        ))
    return prompts
