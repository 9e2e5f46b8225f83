"""The LLaVA JSON format (LLaVA-Pretrain, LLaVA-Instruct-665K) <-> `Conversation`.

A file is a JSON list (or JSON lines) of records:
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}
`image` is relative to an image root (default: the file's folder) and absent for text-only records. The one
"<image>" placeholder is stripped at this edge (records keep plain text); where it stood is kept in
`meta["image_placement"]` only when it was not at the start, so `save` writes the record back as it came.

Also home of what every training-format loader here shares: `Loaded` (records + what `skip_bad` left out),
`collect` and `check_image`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pydantic import ValidationError

from vlsafe.data.formats._common import image_roots, jsonl_lines, resolve_image
from vlsafe.data.records import Conversation, Turn
from vlsafe.errors import VlsafeError

PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}
FROM = {"user": "human", "assistant": "gpt"}


class Loaded(list):
    """The records of a file, plus `skipped`: one line (file, record, reason) per record `skip_bad` left out."""

    def __init__(self, records: Iterable = (), skipped: Iterable[str] = ()):
        super().__init__(records)
        self.skipped: list[str] = list(skipped)


def collect(items: Iterable[tuple[str, object]], convert: Callable, skip_bad: bool) -> Loaded:
    """Converts each (where, raw) with `convert(where, raw) -> record | list[record]`.

    A bad record raises, or with `skip_bad` is counted in `skipped`; a bad file always raises, because a file
    that cannot be read has no records to keep.
    """
    out = Loaded()
    for where, raw in items:
        try:
            if isinstance(raw, VlsafeError):  # a line that did not parse, deferred so it can be skipped
                raise raw
            made = convert(where, raw)
        except ValidationError as err:  # a record model refused it: name the record, keep pydantic's reason
            first = err.errors()[0]
            bad = VlsafeError(f"{where}: {first['msg']} ({'.'.join(str(p) for p in first['loc']) or 'record'})")
            if not skip_bad:
                raise bad from None
            out.skipped.append(str(bad))
            continue
        except VlsafeError as err:
            if not skip_bad:
                raise
            out.skipped.append(str(err))
            continue
        out.extend(made if isinstance(made, list) else [made])
    return out


def check_image(path: str, where: str) -> None:
    """Fails unless Pillow can parse the whole file: a truncated download fails here, not in step 9,000."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise VlsafeError(f"{where}: image {path} is unreadable ({type(err).__name__}: {err})") from None


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for a JSON list or a JSON-lines file; `where` names the file, the record and its id."""
    if path.suffix == ".jsonl":
        for number, line in jsonl_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}: line {number}", VlsafeError(f"{path}: line {number}: malformed JSON: {err.msg}")
                continue
            yield _where(path, f"line {number}", record), record
        return
    from vlsafe.data.formats._common import read_json

    data = read_json(path)
    if not isinstance(data, list):
        raise VlsafeError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield _where(path, f"record {index}", record), record


def _where(path: Path, position: str, record) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: {position}" + (f" (id {str(rid)!r})" if rid is not None else "")


# -------------------------------------------------------------------------------------------------------- load
def load(path: str | Path, image_root: str | Path | None = None, *, skip_bad: bool = False,
         verify_images: bool = True, source: str = "llava") -> Loaded:
    """Reads a LLaVA JSON (or JSON-lines) file into `Conversation`s with absolute image paths.

    Bad records (missing or unreadable image, turns not human/gpt alternating, a misplaced or extra "<image>")
    raise a `VlsafeError` naming the file and record, or with `skip_bad=True` are left out and listed in
    `.skipped`. `verify_images=False` only checks that image files exist (for very large sets).
    """
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: no such file")
    roots = image_roots(path, image_root)

    def convert(where: str, record) -> Conversation:
        if not isinstance(record, dict):
            raise VlsafeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        turns, placement = _turns(record.get("conversations"), where)
        image = record.get("image") or None
        if isinstance(image, list):  # multi-image records (LLaVA-OneVision) have no single-image equivalent
            raise VlsafeError(f"{where}: field 'image' is a list; only one image per record is supported")
        if image is not None and not isinstance(image, str):
            raise VlsafeError(f"{where}: field 'image' should be a path, got {type(image).__name__}")
        if image is None and placement is not None:
            raise VlsafeError(f"{where}: {PLACEHOLDER} in a record without an image")
        meta = {}
        if image is not None:
            image = resolve_image(image, roots, where)
            if verify_images:
                check_image(image, where)
            if placement != "start":  # kept so that `save` writes the record back as it came
                meta["image_placement"] = placement or "none"
        rid = record.get("id")
        if rid is None:  # ids are optional in LLaVA data; the position in the file is stable
            rid = f"{path.stem}-{where[len(str(path)) + 2:].split()[1]}"
        return Conversation(id=str(rid), turns=turns, image=image, source=source, meta=meta)

    return collect(read_records(path), convert, skip_bad)


def _turns(conversations, where: str) -> tuple[list[Turn], str | None]:
    """The turns with the placeholder stripped, and where it stood: "start", "end", "none" (no placeholder in
    an image record) or None (no placeholder at all; the caller decides if that is right)."""
    if not isinstance(conversations, list) or not conversations:
        raise VlsafeError(f"{where}: field 'conversations' should be a non-empty list of turns")
    turns, placement, seen = [], None, 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise VlsafeError(f"{where}: turn {i} should be an object with a string 'value'")
        speaker, value = turn.get("from"), turn["value"]
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(speaker, str) or speaker not in ROLES:
            raise VlsafeError(f"{where}: turn {i} is from {speaker!r} (expected 'human' or 'gpt')")
        if speaker != want:
            raise VlsafeError(f"{where}: turn {i} is from {speaker!r}, expected {want!r} "
                              "(turns must alternate human/gpt, starting with human)")
        count = value.count(PLACEHOLDER)
        seen += count
        if seen > 1:
            raise VlsafeError(f"{where}: more than one {PLACEHOLDER} placeholder (one image per record)")
        if count:
            if speaker == "gpt":
                raise VlsafeError(f"{where}: turn {i} ({speaker}) contains {PLACEHOLDER}; only human turns may")
            # LLaVA itself removes the token and strips the turn, wherever the token stood
            placement = "end" if value.rstrip().endswith(PLACEHOLDER) and not value.lstrip().startswith(
                PLACEHOLDER) else "start"
            value = value.replace(PLACEHOLDER, "").strip()
        if speaker == "gpt" and not value.strip():
            raise VlsafeError(f"{where}: turn {i} (gpt) is empty")
        turns.append(Turn(role=ROLES[speaker], content=value))
    if turns[-1].role != "assistant":
        raise VlsafeError(f"{where}: ends with a human turn (no gpt answer to train on)")
    return turns, placement


# -------------------------------------------------------------------------------------------------------- save
def save(conversations: Iterable[Conversation], path: str | Path, image_root: str | Path) -> None:
    """Writes `conversations` as a LLaVA JSON list; image paths are written relative to `image_root`.

    The placeholder goes into the first user turn as "<image>\\n" + text (or text + "\\n<image>" when
    `meta["image_placement"] == "end"`), which is what LLaVA's own training code expects. The file appears
    whole or not at all.
    """
    path, image_root = Path(path), Path(image_root)
    out = []
    for conv in conversations:
        turns = conv.turns
        if turns and turns[0].role == "system":  # LLaVA JSON has no system turn; dropping it would lose data
            raise VlsafeError(f"{path}: conversation {conv.id!r} has a system turn, which LLaVA JSON cannot hold")
        record = {"id": conv.id}
        placement = conv.meta.get("image_placement", "start")
        if conv.image is not None:
            record["image"] = os.path.relpath(Path(conv.image).resolve(), image_root.resolve()).replace(os.sep, "/")
        values = []
        for i, turn in enumerate(turns):
            value = turn.content
            if i == 0 and conv.image is not None and placement != "none":
                value = f"{value}\n{PLACEHOLDER}" if placement == "end" else f"{PLACEHOLDER}\n{value}"
            values.append({"from": FROM[turn.role], "value": value})
        record["conversations"] = values
        out.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
