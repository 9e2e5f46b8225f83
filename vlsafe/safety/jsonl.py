"""vlsafe's own record files (format `jsonl`): one `Conversation` or `PreferencePair` per line, as JSON.

What the safety builders write and the training stages read. Unlike LLaVA JSON it keeps `source` and `meta`
(which refusal came from which request, which benign answer was the model's own), and it holds preference
pairs. Image paths are written relative to the file's folder and resolved against `image_root` (default: that
folder) on load. A record is a preference pair when it has "chosen", else a conversation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from vlsafe.data.formats._common import image_roots, resolve_image
from vlsafe.data.formats.llava import Loaded, check_image, collect, read_records
from vlsafe.data.records import Conversation, PreferencePair
from vlsafe.errors import VlsafeError


def load(path: str | Path, image_root: str | Path | None = None, *, skip_bad: bool = False,
         verify_images: bool = True) -> Loaded:
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: no such file")
    roots = image_roots(path, image_root)

    def convert(where: str, record):
        if not isinstance(record, dict):
            raise VlsafeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        image = record.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise VlsafeError(f"{where}: field 'image' should be a path")
            # vlsafe wrote this file: its images may sit in a sibling run folder (../synth/images/...)
            record = {**record, "image": resolve_image(image, roots, where, contained=False)}
            if verify_images:
                check_image(record["image"], where)
        if "chosen" in record:
            for name in ("chosen", "rejected", "prompt"):
                if not isinstance(record.get(name), str) or not record[name].strip():
                    raise VlsafeError(f"{where}: field {name!r} is missing or empty")
            if record["chosen"].strip() == record["rejected"].strip():
                raise VlsafeError(f"{where}: chosen and rejected responses are identical")
            return PreferencePair.model_validate(record)
        return Conversation.model_validate(record)

    return collect(read_records(path), convert, skip_bad)


def save(records: Iterable, path: str | Path) -> Path:
    """Writes the records (image paths relative to the file's folder); the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        data = record.model_dump(mode="json")
        if data.get("image"):
            data["image"] = os.path.relpath(Path(data["image"]).resolve(), path.parent.resolve()).replace(os.sep, "/")
        lines.append(json.dumps(data, ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
