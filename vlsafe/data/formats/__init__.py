"""External dataset formats, each converted at this edge into the records of `vlsafe.data.records`.

`FORMATS` maps a format name to "module:function"; the module is imported only when that format is used. Every
loader takes `(path, image_root=None, ...)`, validates every record and returns a list of records (evaluation
formats return `Prompt`s). `path` may also be a dataset hub id where the format has one (online users only).
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path
from typing import Callable

from vlsafe.errors import VlsafeError

FORMATS: dict[str, str] = {
    "xstest": "vlsafe.data.formats.xstest:load",
    "sorry_bench": "vlsafe.data.formats.sorry_bench:load",
    "wildjailbreak": "vlsafe.data.formats.wildjailbreak:load",
    "mmsafetybench": "vlsafe.data.formats.mmsafetybench:load",
    "figstep": "vlsafe.data.formats.figstep:load",
    "siuo": "vlsafe.data.formats.siuo:load",
    "vlguard_test": "vlsafe.data.formats.vlguard_test:load",
    "mmbench": "vlsafe.data.formats.mmbench:load",
    "mme": "vlsafe.data.formats.mme:load",
    "seed_bench": "vlsafe.data.formats.seed_bench:load",
    # training formats (Conversation / PreferencePair records)
    "llava": "vlsafe.data.formats.llava:load",
    "vlguard": "vlsafe.data.formats.vlguard:load",
    "saferlhf": "vlsafe.data.formats.preference:load_saferlhf",
    "spavl": "vlsafe.data.formats.preference:load_spavl",
    "jsonl": "vlsafe.safety.jsonl:load",  # vlsafe's own Conversation / PreferencePair lines (safety builders)
}


def loader(name: str) -> Callable:
    if name not in FORMATS:
        raise VlsafeError(f"unknown format {name!r} (known: {', '.join(sorted(FORMATS))})")
    module, function = FORMATS[name].split(":")
    return getattr(importlib.import_module(module), function)


def load(name: str, path: str | Path, image_root: str | Path | None = None, **options) -> list:
    """Every record of `path` in format `name`, validated; bad input raises one VlsafeError line."""
    from pydantic import ValidationError

    try:
        return loader(name)(path, image_root=image_root, **options)
    except ValidationError as err:  # a field of the wrong type reached a record model: still one line
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        raise VlsafeError(f"{path}: a record's field {field!r}: {first['msg']} "
                          f"(got {str(first.get('input'))[:60]!r})") from None


def summarize(records: list) -> dict:
    """Counts for a loaded file: records, and per label / category / source / condition where records have them."""
    summary: dict = {"records": len(records)}
    for key in ("label", "category", "source"):
        counts = Counter(getattr(r, key, None) for r in records if getattr(r, key, None))
        if counts:
            summary[f"{key}s" if key != "category" else "categories"] = dict(sorted(counts.items()))
    summary["with_image"] = sum(1 for r in records if getattr(r, "image", None))
    for key in ("subset", "variant", "data_type"):
        counts = Counter(r.meta[key] for r in records if key in getattr(r, "meta", {}))
        if counts:
            summary[f"{key}s"] = dict(sorted(counts.items()))
    return summary


def inspect(path: str | Path, name: str, image_root: str | Path | None = None) -> dict:
    """`vlsafe data inspect`: validate every record of `path` and summarise it."""
    records = load(name, path, image_root=image_root)
    return {"format": name, "path": str(path), **summarize(records)}
