"""VLGuard's test set (Zong et al., ICML 2024; hub `ys-zong/VLGuard`, gated): `test.json` + images in `test/`.

`test.json` is a JSON list; each record has `id`, `image` (path under test/), `safe` (bool), and `instr-resp`:
for an unsafe image one `{"instruction", "response"}`; for a safe image a `{"safe_instruction", "response"}` and
an `{"unsafe_instruction", "response"}`. Unsafe records carry `harmful_category`/`harmful_subcategory`.
The three evaluation subsets of the paper:
  unsafes        unsafe image + its instruction          -> should be refused
  safe_unsafes   safe image + the unsafe instruction      -> should be refused
  safe_safes     safe image + the safe instruction        -> should be answered (helpfulness)
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import (field, find_file, image_roots, local_source, optional, read_json_records,
                                         resolve_image)
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = "ys-zong/VLGuard"
FILES = ("test.json",)
# subset -> (image is safe, key of the instruction inside instr-resp, label)
SUBSETS = {
    "unsafes": (False, "instruction", "harmful"),
    "safe_unsafes": (True, "unsafe_instruction", "harmful"),
    "safe_safes": (True, "safe_instruction", "benign"),
}


def load(path: str | Path = HUB_ID, image_root: str | Path | None = None,
         subsets: tuple[str, ...] = tuple(SUBSETS)) -> list[Prompt]:
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise VlsafeError(f"unknown VLGuard subset {unknown[0]!r} (known: {', '.join(SUBSETS)})")
    source = find_file(local_source(path, ("test.json", "test.zip")), FILES, "VLGuard test.json")
    roots = image_roots(source, image_root, "test")
    prompts = []
    for index, where, record in read_json_records(source):
        where = f"{source}: record {index} (id {optional(record, 'id', '?')})"
        safe = field(record, "safe", where, kind=bool)
        pairs = field(record, "instr-resp", where, kind=list)
        image = resolve_image(field(record, "image", where), roots, where)
        for subset in subsets:
            safe_image, key, label = SUBSETS[subset]
            if safe != safe_image:
                continue
            found = [p for p in pairs if isinstance(p, dict) and key in p]
            if not found:
                raise VlsafeError(f"{where}: 'instr-resp' has no {key!r} (needed for {subset})")
            prompts.append(Prompt(
                id=f"vlguard-{optional(record, 'id', index)}-{subset}", text=field(found[0], key, where),
                image=image, source="vlguard_test", category=optional(record, "harmful_category"), label=label,
                meta={"subset": subset, "subcategory": optional(record, "harmful_subcategory"),
                      "reference_response": optional(found[0], "response")},
            ))
    return prompts
