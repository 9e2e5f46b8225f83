"""MMBench (Liu et al., 2023): multiple-choice visual questions, published as TSV with base64 images.

Columns of `MMBench_DEV_EN.tsv` and friends (OpenCompass / VLMEvalKit): index, question, hint, A, B, C, D,
answer, category, image, source, l2-category, comment, split; the test files have no `answer`. `image` is a
base64-encoded image, or (VLMEvalKit's de-duplicated files) the `index` of the row that holds it. Options are
the non-empty letter columns. Decoded images are written once, named by content hash.
"""

from __future__ import annotations

import base64
import binascii
import io
import string
from pathlib import Path

from vlsafe.data.formats._common import cache_dir, field, local_source, multiple_choice_text, optional, read_table
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = None  # distributed as TSV by OpenCompass; the hub copies (lmms-lab/MMBench) are parquet
REQUIRED = ("index", "question", "A", "B", "image")


def load(path: str | Path, image_root: str | Path | None = None) -> list[Prompt]:
    """`image_root` is where decoded images are written (default: <VLSAFE_CACHE>/images/<file stem>)."""
    from vlsafe.data.render import store_image_bytes

    source = local_source(path)
    out_dir = Path(image_root) if image_root is not None else cache_dir() / "images" / source.stem
    rows = list(read_table(source, required=REQUIRED, delimiter="\t"))
    by_index = {row["index"]: row for _, row in rows}
    letters = [c for c in string.ascii_uppercase if c in (rows[0][1] if rows else {})]
    stored: dict[str, str] = {}
    prompts = []
    for line, row in rows:
        where = f"{source}: line {line} (index {optional(row, 'index', '?')})"
        index = field(row, "index", where)
        data = _image_cell(row, by_index, where)
        if data not in stored:
            stored[data] = store_image_bytes(_decode(data, where), out_dir)
        options = {c: row[c] for c in letters if optional(row, c).strip() and row[c].strip().lower() != "nan"}
        if len(options) < 2:
            raise VlsafeError(f"{where}: fewer than two options in columns {', '.join(letters)}")
        answer = optional(row, "answer").strip() or None
        if answer is not None and answer not in options:
            raise VlsafeError(f"{where}: field 'answer' is {answer!r}, not one of the options {', '.join(options)}")
        hint = optional(row, "hint")
        prompts.append(Prompt(
            id=f"mmbench-{index}", text=multiple_choice_text(field(row, "question", where), options,
                                                             "" if hint.lower() == "nan" else hint),
            image=stored[data], source="mmbench", category=optional(row, "category"), label="benign",
            answer=answer, meta={"l2_category": optional(row, "l2-category"), "split": optional(row, "split"),
                                 "options": options},
        ))
    return prompts


def _image_cell(row: dict, by_index: dict, where: str) -> str:
    data = field(row, "image", where)
    if len(data) <= 64 and data in by_index:  # a reference to the row that carries the image
        data = field(by_index[data], "image", f"{where} -> index {data}")
    return data


def _decode(data: str, where: str) -> bytes:
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
        Image.open(io.BytesIO(raw)).verify()
    except (binascii.Error, ValueError):
        raise VlsafeError(f"{where}: field 'image' is not valid base64") from None
    except Exception as err:
        raise VlsafeError(f"{where}: field 'image' does not decode to an image ({type(err).__name__})") from None
    return raw
