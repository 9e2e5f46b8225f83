"""What every format module shares: reading files with line numbers, required fields, image resolution, hub ids.

Every error is a `VlsafeError` naming the file, the record (line or id) and the field, in one line.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Iterator

from vlsafe.errors import VlsafeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".JPG", ".JPEG", ".PNG")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------------ reading
def read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlsafeError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VlsafeError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def read_json_records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """Yields (index, "file: record i", object) for a file holding a JSON list of objects."""
    records = read_json(path)
    if not isinstance(records, list):
        raise VlsafeError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise VlsafeError(f"{where}: expected an object, got {type(record).__name__}")
        yield index, where, record


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a UTF-8 JSON-lines file."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    except FileNotFoundError:
        raise VlsafeError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return ((number, line) for number, line in enumerate(lines, start=1) if line.strip())


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line."""
    for number, line in jsonl_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise VlsafeError(f"{path}: line {number}: malformed JSON: {err.msg}") from None
        if not isinstance(obj, dict):
            raise VlsafeError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def read_table(path: Path, required: tuple[str, ...], delimiter: str = ",",
               skip_comments: bool = False) -> Iterator[tuple[int, dict]]:
    """Yields (line number, row) for a CSV/TSV with a header; a missing column fails before any row is read."""
    csv.field_size_limit(sys.maxsize)  # base64 images in TSV cells run to megabytes
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise VlsafeError(f"{path}: no such file") from None
    with handle:
        lines = (line for line in handle if not (skip_comments and line.startswith("#")))
        reader = csv.DictReader(lines, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError) as err:
            raise VlsafeError(f"{path}: unreadable header: {err}") from None
        missing = [name for name in required if name not in header]
        if missing:
            raise VlsafeError(f"{path}: missing column {missing[0]!r} (header has: {', '.join(header) or 'nothing'})")
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise VlsafeError(f"{path}: line {reader.line_num}: more cells than the header has columns")
                yield reader.line_num, row
        except csv.Error as err:
            raise VlsafeError(f"{path}: line {reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: "
                              f"{err}") from None
        except UnicodeDecodeError as err:
            raise VlsafeError(f"{path}: after line {reader.line_num}: not UTF-8 text ({err.reason})") from None


# ------------------------------------------------------------------------------------------------------ fields
def field(record: dict, name: str, where: str, kind: type = str, allow_empty: bool = False):
    """`record[name]`, required and of `kind`; `where` is "file: record ..." for the error line."""
    if name not in record or record[name] is None:
        raise VlsafeError(f"{where}: missing field {name!r}")
    value = record[name]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind):
        raise VlsafeError(f"{where}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    if kind is str and not allow_empty and not value.strip():
        raise VlsafeError(f"{where}: empty field {name!r}")
    return value


def optional(record: dict, name: str, default=""):
    value = record.get(name)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return default
    return value


# ------------------------------------------------------------------------------------------------------ images
def resolve_image(name: str, roots: list[Path], where: str, try_suffixes: bool = False,
                  contained: bool = True) -> str:
    """The absolute path of an image named relative to one of `roots`, or a VlsafeError naming it.

    A data file is input from elsewhere, so by default (`contained`) its image paths may not leave the image
    roots: absolute paths, '..' and an image file that is a symlink to somewhere outside are refused (otherwise
    `../../etc/passwd` in a downloaded file makes vlsafe open any file). Symlinked *folders* are followed: LLaVA
    set-ups link `coco/` to another disk. vlsafe's own record files, which place images relative to the file
    and may point into a sibling run folder, pass `contained=False`: then only image files are accepted.
    """
    if not isinstance(name, str) or not name:
        raise VlsafeError(f"{where}: image path should be a non-empty string, got {type(name).__name__}")
    if "\x00" in name:
        raise VlsafeError(f"{where}: image path {name!r} contains a NUL byte")
    candidate = Path(name)
    if contained and (candidate.is_absolute() or ".." in candidate.parts):
        raise VlsafeError(f"{where}: image path {name!r} leaves the data folder (absolute or '..'); refused")
    tries = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    if try_suffixes and not candidate.suffix:
        tries += [t.with_name(t.name + suffix) for t in list(tries) for suffix in IMAGE_SUFFIXES]
    for path in tries:
        if path.is_file():
            real = path.resolve()
            if contained and path.is_symlink() and not any(
                    real.is_relative_to(root.resolve()) for root in roots):
                raise VlsafeError(f"{where}: image {name!r} is a link to {real}, outside the data folder; refused")
            if not contained and real.suffix.lower() not in IMAGE_SUFFIXES:
                raise VlsafeError(f"{where}: image {name!r} resolves to {real}, which is not an image file")
            return str(real)
    searched = ", ".join(str(r) for r in roots) if not candidate.is_absolute() else "(absolute path)"
    raise VlsafeError(f"{where}: image {name!r} not found (searched {searched})")


def image_roots(path: Path, image_root: str | Path | None, *subdirs: str) -> list[Path]:
    """Where to look for images: the given root only, else the file's folder and the format's usual subfolders."""
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise VlsafeError(f"{root}: image root is not a directory")
        return [root]
    base = path if path.is_dir() else path.parent
    return [base / sub for sub in subdirs if (base / sub).is_dir()] + [base]


# ------------------------------------------------------------------------------------------------------ sources
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet", ".zip")


def is_hub_id(source: str | Path) -> bool:
    """An "owner/name" that is not a local path (and does not end like a data file, so a mistyped path stays local)."""
    return (isinstance(source, str) and not Path(source).exists() and bool(_HUB_ID.match(source))
            and not source.lower().endswith(DATA_SUFFIXES))


def local_source(source: str | Path, patterns: tuple[str, ...] = ()) -> Path:
    """A local path for `source`: the path itself, or a snapshot of a dataset hub id (online users only).

    `patterns` limit what is downloaded (e.g. the question file and the image archive); zip archives in the
    snapshot are extracted beside themselves once.
    """
    if not is_hub_id(source):
        path = Path(source)
        if not path.exists():
            raise VlsafeError(f"{path}: no such file or directory")
        return path
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=str(source), repo_type="dataset", allow_patterns=list(patterns) or None)
    except Exception as err:  # offline, gated, or no such dataset: one line, not a traceback
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise VlsafeError(f"{source}: no such local path, and could not fetch it from the dataset hub "
                          f"({type(err).__name__}: {detail})") from None
    folder = Path(folder)
    _extract_archives(folder)
    return folder


def _extract_archives(folder: Path) -> None:
    import zipfile

    for archive in folder.rglob("*.zip"):
        done = archive.with_name(archive.name + ".extracted")
        if done.exists():
            continue
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():  # refuse members that would land outside the folder
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise VlsafeError(f"{archive}: unsafe member path {member!r}")
            zipped.extractall(archive.parent)
        done.touch()


def find_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """`folder` itself if it is a file; else the first of `names` (glob patterns) found under it."""
    if folder.is_file():
        return folder
    for pattern in names:
        hits = sorted(folder.rglob(pattern))
        if hits:
            return hits[0]
    raise VlsafeError(f"{folder}: no {what} found (looked for {', '.join(names)})")


# ------------------------------------------------------------------------------------------------------ prompts
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def multiple_choice_text(question: str, options: dict[str, str], hint: str = "") -> str:
    """The LLaVA-style multiple-choice prompt used for MMBench and SEED-Bench: hint, question, lettered options."""
    lines = ([hint.strip()] if hint.strip() else []) + [question.strip()]
    lines += [f"{letter}. {text.strip()}" for letter, text in options.items()]
    return "\n".join(lines + [MULTIPLE_CHOICE_INSTRUCTION])


def cache_dir() -> Path:
    """Where decoded images go when the caller names no directory (VLSAFE_CACHE, else ~/.cache/vlsafe)."""
    from vlsafe.io import cache_dir as vlsafe_cache

    return vlsafe_cache()
