"""VLGuard TRAINING data (Zong et al., ICML 2024) -> `Conversation`s for post-hoc or mixed safety SFT.

Published as `train.json` + `train.zip` (github.com/ys-zong/VLGuard; hub `ys-zong/VLGuard`), a JSON list of
    {"id": "Ads_423222", "image": "bad_ads/<uuid>.png", "safe": true,
     "instr-resp": [{"safe_instruction": "...", "response": "..."}, {"unsafe_instruction": "...", "response": "..."}]}
    {"id": "Ads_364812", "image": "bad_ads/<uuid>.png", "safe": false, "harmful_category": "...",
     "harmful_subcategory": "...", "instr-resp": [{"instruction": "...", "response": "..."}]}
A safe image carries a safe instruction (answered helpfully) and an unsafe one (refused); a harmful image
carries one instruction (refused). Each instruction becomes its own single-turn conversation, so that a stage
can select by `meta["instruction_kind"]` (safe | unsafe | harmful_image) and `meta["safe_image"]`.
Images resolve against `image_root`, else the file's folder and its `train/` subfolder (where train.zip unpacks).
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import field, find_file, image_roots, local_source, optional, resolve_image
from vlsafe.data.formats.llava import Loaded, check_image, collect, read_records
from vlsafe.data.records import Conversation, Turn
from vlsafe.errors import VlsafeError

HUB_ID = "ys-zong/VLGuard"
FILES = ("train.json",)
KINDS = {"safe_instruction": "safe", "unsafe_instruction": "unsafe", "instruction": "harmful_image"}


def load(path: str | Path = HUB_ID, image_root: str | Path | None = None, *, skip_bad: bool = False,
         verify_images: bool = True) -> Loaded:
    """Reads VLGuard's train.json; a bad record raises a `VlsafeError` naming it, or is skipped with `skip_bad`."""
    source = find_file(local_source(path, ("train.json", "train.zip")), FILES, "VLGuard train.json")
    roots = image_roots(source, image_root, "train")

    def convert(where: str, record) -> list[Conversation]:
        if not isinstance(record, dict):
            raise VlsafeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rid = field(record, "id", where)
        safe = field(record, "safe", where, bool)
        items = record.get("instr-resp")
        if not isinstance(items, list) or not items:
            raise VlsafeError(f"{where}: field 'instr-resp' should be a non-empty list")
        image = resolve_image(field(record, "image", where), roots, where)
        if verify_images:
            check_image(image, where)
        out, seen = [], set()
        for j, item in enumerate(items):
            at = f"{where}: instr-resp[{j}]"
            keys = [key for key in KINDS if isinstance(item, dict) and key in item]
            if len(keys) != 1:
                raise VlsafeError(f"{at}: needs exactly one of {', '.join(KINDS)} (found {len(keys)})")
            key = keys[0]
            # the published data pairs 'instruction' with harmful images only; a mismatch means mislabelled data
            if (key == "instruction") == safe:
                want = "safe_instruction or unsafe_instruction" if safe else "instruction"
                raise VlsafeError(f"{at}: has {key!r} but the image is marked safe={safe} (expected {want})")
            kind = KINDS[key]
            cid = f"{rid}:{kind}" if kind not in seen else f"{rid}:{kind}-{j}"
            seen.add(kind)
            meta = {"safe_image": safe, "instruction_kind": kind}
            for extra in ("harmful_category", "harmful_subcategory"):
                if optional(record, extra):
                    meta[extra] = record[extra]
            out.append(Conversation(id=cid, image=image, source="vlguard", meta=meta, turns=[
                Turn(role="user", content=field(item, key, at)),
                Turn(role="assistant", content=field(item, "response", at))]))
        return out

    return collect(read_records(source), convert, skip_bad)
