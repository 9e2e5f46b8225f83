"""SEED-Bench (Li et al., 2023): four-way multiple choice over 12 dimensions (9 image, 3 video).

Published (github.com/AILab-CVC/SEED-Bench; hub `AILab-CVC/SEED-Bench`): `SEED-Bench.json` =
{"questions": [{"answer": "A", "choice_a".."choice_d", "data_id", "data_type": "image"|"video", "question",
"question_id", "question_type_id"}], "question_type": {"Scene Understanding": 1, ...}}; images in
`SEED-Bench-image/<data_id>` (from SEED-Bench-image.zip). Video questions need extracted frames and are skipped.
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import (field, find_file, image_roots, local_source, multiple_choice_text,
                                         read_json, resolve_image)
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = "AILab-CVC/SEED-Bench"
FILES = ("SEED-Bench.json",)
CHOICES = {"A": "choice_a", "B": "choice_b", "C": "choice_c", "D": "choice_d"}
REQUIRED = ("question_id", "question", "data_id", "data_type", "answer", "question_type_id", *CHOICES.values())


def load(path: str | Path = HUB_ID, image_root: str | Path | None = None) -> list[Prompt]:
    source = find_file(local_source(path, ("SEED-Bench.json", "SEED-Bench-image.zip")), FILES, "SEED-Bench.json")
    table = read_json(source)
    if not isinstance(table, dict) or not isinstance(table.get("questions"), list):
        raise VlsafeError(f"{source}: expected an object with a 'questions' list")
    types = table.get("question_type") or {}
    if not isinstance(types, dict):
        raise VlsafeError(f"{source}: 'question_type' should be an object of name: id")
    type_names = {int(v): k for k, v in types.items() if str(v).isdecimal()}
    roots = image_roots(source, image_root, "SEED-Bench-image")
    prompts = []
    for index, item in enumerate(table["questions"]):
        where = f"{source}: question {index}"
        if not isinstance(item, dict):
            raise VlsafeError(f"{where}: expected an object, got {type(item).__name__}")
        values = {name: field(item, name, where) for name in REQUIRED}
        where = f"{source}: question {index} (question_id {values['question_id']})"
        if values["data_type"] != "image":
            continue
        answer = values["answer"].strip()
        if answer not in CHOICES:
            raise VlsafeError(f"{where}: field 'answer' is {answer!r} (expected A, B, C or D)")
        if not values["question_type_id"].strip().isdecimal():
            raise VlsafeError(f"{where}: field 'question_type_id' should be a whole number")
        type_id = int(values["question_type_id"])
        options = {letter: values[key] for letter, key in CHOICES.items()}
        prompts.append(Prompt(
            id=f"seed_bench-{values['question_id']}", text=multiple_choice_text(values["question"], options),
            image=resolve_image(values["data_id"], roots, where, try_suffixes=True), source="seed_bench",
            category=type_names.get(type_id, str(type_id)), label="benign", answer=answer,
            meta={"question_type_id": type_id, "options": options},
        ))
    return prompts
