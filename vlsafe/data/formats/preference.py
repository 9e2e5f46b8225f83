"""Safety preference data for DPO -> `PreferencePair`: PKU-SafeRLHF (text) and SPA-VL (image + text).

PKU-SafeRLHF (hub `PKU-Alignment/PKU-SafeRLHF`, `data/<model>/{train,test}.jsonl`; older `round0/*.jsonl.xz`):
    {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
     "better_response_id", "safer_response_id", "prompt_source", "response_0_severity_level", ...}
  chosen = the safer response by default (`prefer="better"` takes the more helpful one instead).
SPA-VL (hub `sqrti/SPA-VL`, parquet `data/train-*.parquet`, `validation/validation-*.parquet`):
    {"image": {"bytes": ..., "path": ...}, "question", "chosen", "rejected", "image_name"}  (+ class1..3)
  JSON/JSON-lines exports with `image` (or `image_name`) as a path relative to `image_root` load too. Images
  embedded in parquet are written once to `extract_dir` (default: `<file stem>_images/` beside the file),
  named by content hash, because records carry image paths, not bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from vlsafe.data.formats._common import field, image_roots, local_source, optional, resolve_image
from vlsafe.data.formats.llava import Loaded, check_image, collect, read_records
from vlsafe.data.records import PreferencePair
from vlsafe.errors import VlsafeError

SAFERLHF_HUB = "PKU-Alignment/PKU-SafeRLHF"
SPAVL_HUB = "sqrti/SPA-VL"
PREFER = {"safer": "safer_response_id", "better": "better_response_id"}


def _files(source: Path, patterns: tuple[str, ...], what: str) -> list[Path]:
    """The file itself, or every file under a folder matching the first pattern that matches (all shards)."""
    if source.is_file():
        return [source]
    for pattern in patterns:
        hits = sorted(p for p in source.rglob(pattern) if p.is_file())
        if hits:
            return hits
    raise VlsafeError(f"{source}: no {what} found (looked for {', '.join(patterns)})")


def _load_all(files: list[Path], convert_in, skip_bad: bool) -> Loaded:
    """Every record of every shard, converted by `convert_in(file)`; skipped records counted across shards."""
    out = Loaded()
    for file in files:
        part = collect(_rows(file), convert_in(file), skip_bad)
        out.extend(part)
        out.skipped.extend(part.skipped)
    return out


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for .json, .jsonl, .jsonl.xz and .parquet files."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
        except ImportError:
            raise VlsafeError(f"{path}: reading parquet needs the 'pyarrow' package") from None
        except Exception as err:  # pyarrow raises its own types for a damaged file
            raise VlsafeError(f"{path}: unreadable parquet ({type(err).__name__}: {err})") from None
        index = 0
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{path}: row {index}", row
                index += 1
    elif name.endswith(".jsonl.xz"):
        import json
        import lzma

        with lzma.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield f"{path}: line {number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"{path}: line {number}", VlsafeError(f"{path}: line {number}: malformed JSON: {err.msg}")
    else:
        yield from read_records(path)


def _pair_texts(chosen: str, rejected: str, where: str) -> None:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise VlsafeError(f"{where}: the {name} response is empty")
    if chosen.strip() == rejected.strip():  # a pair with no preference signal; DPO would learn nothing from it
        raise VlsafeError(f"{where}: chosen and rejected responses are identical")


def _label(path: Path, where: str) -> str:
    """A stable record id: the folder (e.g. Alpaca-7B, one per responding model), file and position."""
    return f"{path.parent.name}/{path.name}:{where[len(str(path)) + 2:].split()[1]}"


# ---------------------------------------------------------------------------------------------- PKU-SafeRLHF
def load_saferlhf(path: str | Path = SAFERLHF_HUB, image_root: str | Path | None = None, *, split: str = "train",
                  prefer: str = "safer", skip_bad: bool = False) -> Loaded:
    """PKU-SafeRLHF pairs; `prefer` = "safer" (safer_response_id) or "better" (better_response_id).

    Text only: `image_root` is accepted (and ignored) so every format loads through one call shape."""
    if prefer not in PREFER:
        raise VlsafeError(f"saferlhf: prefer must be one of {', '.join(PREFER)}, got {prefer!r}")
    patterns = (f"{split}.jsonl", f"{split}.jsonl.xz", f"{split}.json", f"{split}-*.parquet")
    source = local_source(path, (f"data/*/{split}.jsonl",))  # the hub's current layout, all responding models
    key = PREFER[prefer]

    def convert_in(file: Path):
        def convert(where: str, record) -> PreferencePair:
            if not isinstance(record, dict):
                raise VlsafeError(f"{where}: expected a JSON object, got {type(record).__name__}")
            responses = [field(record, f"response_{k}", where, allow_empty=True) for k in (0, 1)]
            index = record.get(key)
            if isinstance(index, bool) or index not in (0, 1):
                raise VlsafeError(f"{where}: field {key!r} should be 0 or 1, got {index!r}")
            chosen, rejected = responses[index], responses[1 - index]
            _pair_texts(chosen, rejected, where)
            meta = {"prefer": prefer, "chosen_index": index, "safer_response_id": record.get("safer_response_id"),
                    "better_response_id": record.get("better_response_id"),
                    "is_chosen_safe": record.get(f"is_response_{index}_safe"),
                    "is_rejected_safe": record.get(f"is_response_{1 - index}_safe")}
            if optional(record, "prompt_source"):
                meta["prompt_source"] = record["prompt_source"]
            return PreferencePair(id=f"saferlhf:{_label(file, where)}", prompt=field(record, "prompt", where),
                                  chosen=chosen, rejected=rejected, source="pku-saferlhf", meta=meta)
        return convert

    return _load_all(_files(source, patterns, f"PKU-SafeRLHF {split} file"), convert_in, skip_bad)


# ---------------------------------------------------------------------------------------------------- SPA-VL
def load_spavl(path: str | Path = SPAVL_HUB, image_root: str | Path | None = None, *, split: str = "train",
               skip_bad: bool = False, verify_images: bool = True, extract_dir: str | Path | None = None) -> Loaded:
    """SPA-VL pairs with absolute image paths; `split` picks the shards of a downloaded folder."""
    folder = {"train": "data", "validation": "validation"}.get(split, split)
    patterns = (f"{folder}/{split}-*.parquet", f"{split}-*.parquet", f"{split}.jsonl", f"{split}.json")
    source = local_source(path, (f"{folder}/*",))

    def convert_in(file: Path):
        roots = image_roots(file, image_root)
        cache = Path(extract_dir) if extract_dir is not None else file.parent / f"{file.name.split('.')[0]}_images"

        def convert(where: str, record) -> PreferencePair:
            if not isinstance(record, dict):
                raise VlsafeError(f"{where}: expected a JSON object, got {type(record).__name__}")
            chosen = field(record, "chosen", where, allow_empty=True)
            rejected = field(record, "rejected", where, allow_empty=True)
            _pair_texts(chosen, rejected, where)
            image = _spavl_image(record, roots, cache, where)
            if verify_images:
                check_image(image, where)
            meta = {k: record[k] for k in ("image_name", "class1", "class2", "class3") if optional(record, k)}
            return PreferencePair(id=f"spavl:{_label(file, where)}", prompt=field(record, "question", where),
                                  chosen=chosen, rejected=rejected, image=image, source="spa-vl", meta=meta)
        return convert

    return _load_all(_files(source, patterns, f"SPA-VL {split} file"), convert_in, skip_bad)


def _spavl_image(record: dict, roots: list[Path], cache: Path, where: str) -> str:
    image = record.get("image")
    if isinstance(image, dict) and image.get("bytes"):  # a `datasets` Image feature, stored inline
        data = image["bytes"]
        suffix = Path(image.get("path") or record.get("image_name") or "x.png").suffix or ".png"
        target = cache / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")  # never leave a half-written image behind
            partial.write_bytes(data)
            os.replace(partial, target)
        return str(target.resolve())
    if isinstance(image, dict):
        image = image.get("path")
    name = image if isinstance(image, str) and image else optional(record, "image_name", None)
    if not name:
        raise VlsafeError(f"{where}: missing field 'image' (and no 'image_name')")
    return resolve_image(name, roots, where)
