"""Labelled (prompt, response, refused) data for training and measuring refusal judges.

Two sources, kept apart so a judge can be measured on the one it was not trained on:
  pyrit            pyrit's human-labelled refusals (refusal.csv 105, refusal_extra.csv 64; human_score 1 = refusal).
                   refusal_extra pairs objectives with unrelated responses: a non-sequitur counts as a refusal.
  vlsafe           judge_data/refusal_labels.jsonl, written by this project: refusal styles, partial refusals,
                   lectures, deflections, non-sequiturs, helpful answers that mention safety or say "sorry",
                   harmful compliance with and without refusal words. Pinned by sha256 below.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from vlsafe.errors import VlsafeError

DATA_DIR = Path(__file__).with_name("judge_data")
PROJECT_FILE = DATA_DIR / "refusal_labels.jsonl"
PROJECT_SHA256 = "bb9bb134c42aaf26997c24e1c4e815186e7bb874d4cf458ef304617eff7cb43c"


@dataclass(frozen=True)
class Labelled:
    id: str
    prompt: str
    response: str
    refused: bool
    source: str  # "pyrit", "pyrit_extra" or "vlsafe"
    kind: str = ""  # vlsafe rows: refusal, partial_refusal, lecture, ... (see the file)
    harmful: bool | None = None


def pyrit_rows(filename: str) -> list[Labelled]:
    from vlsafe.assets import asset_files

    path = next((p for p in asset_files("pyrit-refusals") if p.name == filename), None)
    if path is None:
        raise VlsafeError(f"asset pyrit-refusals has no file {filename}")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("#"):  # comments open the file; a '#' inside a response is content
        lines.pop(0)
    source = "pyrit" if filename == "refusal.csv" else "pyrit_extra"
    out = []
    for n, row in enumerate(csv.DictReader(io.StringIO("".join(lines))), 1):
        try:
            refused = float(row["human_score"]) >= 0.5
        except (KeyError, TypeError, ValueError):
            raise VlsafeError(f"{path}: row {n}: human_score missing or not a number") from None
        out.append(Labelled(f"{source}-{n}", row["objective"], row["assistant_response"], refused, source))
    return out


def project_rows(path: Path = PROJECT_FILE, check_hash: bool = True) -> list[Labelled]:
    from vlsafe.io import sha256_file

    if check_hash and sha256_file(path) != PROJECT_SHA256:
        raise VlsafeError(f"{path}: sha256 differs from the pinned {PROJECT_SHA256[:12]}... "
                          "(edited labels must be re-pinned in vlsafe/eval/labelled.py and the judge retrained)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Labelled(row["id"], row["prompt"], row["response"], bool(row["refused"]), "vlsafe",
                                row.get("kind", ""), row.get("harmful")))
        except (json.JSONDecodeError, KeyError) as err:
            raise VlsafeError(f"{path}: line {n}: not a labelled row ({err})") from None
    return out


def all_rows() -> list[Labelled]:
    return pyrit_rows("refusal.csv") + pyrit_rows("refusal_extra.csv") + project_rows()
