"""WildJailbreak (Jiang et al., 2024; hub `allenai/wildjailbreak`), TSV.

`eval/eval.tsv` has columns `adversarial, label, data_type` (2,000 adversarial_harmful + 210 adversarial_benign;
label 1 = harmful). `train/train.tsv` has `vanilla, adversarial, tactics, completion, data_type` where
`data_type` is one of vanilla_harmful, vanilla_benign, adversarial_harmful, adversarial_benign; vanilla rows
have an empty `adversarial` cell. The prompt is the adversarial text when there is one, else the vanilla text.
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import find_file, local_source, optional, read_table
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = "allenai/wildjailbreak"
FILES = ("eval.tsv", "*.tsv")
DATA_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")


def load(path: str | Path = HUB_ID, image_root=None, limit: int | None = None) -> list[Prompt]:
    """All rows (or the first `limit`: the train file has 261k)."""
    source = find_file(local_source(path, ("eval/*",)), FILES, "WildJailbreak TSV")
    prompts = []
    for line, row in read_table(source, required=("adversarial", "data_type"), delimiter="\t"):
        where = f"{source}: line {line}"
        data_type = optional(row, "data_type").strip()
        if data_type not in DATA_TYPES:
            raise VlsafeError(f"{where}: field 'data_type' is {data_type!r} (expected one of {', '.join(DATA_TYPES)})")
        text = optional(row, "adversarial").strip() or optional(row, "vanilla").strip()
        if not text:
            raise VlsafeError(f"{where}: empty fields 'adversarial' and 'vanilla' (no prompt)")
        label = "harmful" if data_type.endswith("harmful") else "benign"
        if optional(row, "label").strip() not in ("", "1" if label == "harmful" else "0"):
            raise VlsafeError(f"{where}: field 'label' is {row['label']!r} but data_type is {data_type}")
        meta = {"data_type": data_type, "tactics": optional(row, "tactics")}
        if optional(row, "vanilla") and optional(row, "adversarial"):
            meta["vanilla"] = row["vanilla"]
        prompts.append(Prompt(id=f"wildjailbreak-{line}", text=text, source="wildjailbreak",
                              category=data_type, label=label, meta=meta))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts
