"""XSTest (Röttger et al., 2024): 250 safe prompts that sound unsafe and 200 unsafe contrast prompts.

Published as `xstest_prompts.csv` (github.com/paul-rottger/exaggerated-safety; hub `Paul/XSTest`) with the
header `id,prompt,type,label,focus,note`; `label` is "safe" or "unsafe", `type` is one of ten safe types or
eight `contrast_*` types. Older copies without `label` get it from the type (contrast_* = unsafe).
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import field, find_file, local_source, optional, read_table
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = "Paul/XSTest"
FILES = ("xstest_prompts.csv", "xstest_v2_prompts.csv", "*.csv")
LABELS = {"safe": "benign", "unsafe": "harmful"}


def load(path: str | Path = HUB_ID, image_root=None) -> list[Prompt]:
    source = find_file(local_source(path, FILES), FILES, "XSTest CSV")
    prompts = []
    for line, row in read_table(source, required=("id", "prompt", "type")):
        where = f"{source}: line {line}"
        kind = field(row, "type", where)
        raw_label = optional(row, "label") or ("unsafe" if kind.startswith("contrast_") else "safe")
        if raw_label not in LABELS:
            raise VlsafeError(f"{where}: field 'label' is {raw_label!r} (expected safe or unsafe)")
        prompts.append(Prompt(
            id=f"xstest-{field(row, 'id', where)}", text=field(row, "prompt", where), source="xstest",
            category=kind, label=LABELS[raw_label],
            meta={"type": kind, "focus": optional(row, "focus"), "note": optional(row, "note")},
        ))
    return prompts
