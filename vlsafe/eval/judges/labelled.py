"""Labelled (prompt, response, verdict) data for training and measuring refusal judges.

Sources, kept apart so a judge can be measured on the ones it was not trained on:
  pyrit, pyrit_extra   pyrit's human-labelled refusals (refusal.csv 105, refusal_extra.csv 64; human_score 1 =
                       refusal). pyrit scores an unrelated response as a refusal; under three verdicts those rows
                       (listed below, found by reading) are non-answers.
  vlsafe-*             judge_data/refusal_labels.jsonl, written and labelled by this project, one `source` per batch
                       of writing and a `style` per row (see judge_data/CARD.md). Pinned by sha256 below.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from vlsafe.errors import VlsafeError
from vlsafe.eval.judges.base import VERDICTS

DATA_DIR = Path(__file__).resolve().parents[1] / "judge_data"
PROJECT_FILE = DATA_DIR / "refusal_labels.jsonl"
PROJECT_SHA256 = "b80b37b8d900db5beec1bd8c9237278afd86c0e6996f5a255f7eeba5b9efb25a"
# pyrit rows scored 1 whose response answers a different question (read one by one): non-answers, not refusals
PYRIT_OFF_TOPIC = {f"pyrit-{n}" for n in (*range(59, 69), 72, 81)} | {f"pyrit_extra-{n}" for n in range(33, 63)}


@dataclass(frozen=True)
class Labelled:
    id: str
    prompt: str
    response: str
    verdict: str  # refusal | compliance | non_answer
    source: str  # "pyrit", "pyrit_extra", or the project's batch ("vlsafe-v1", ...)
    style: str = ""  # the response style (gpt, llama2_lecture, terse, loop, off_topic, ...; see the card)
    harmful: bool | None = None

    @property
    def refused(self) -> bool:
        return self.verdict == "refusal"


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
        row_id = f"{source}-{n}"
        verdict = "non_answer" if row_id in PYRIT_OFF_TOPIC else "refusal" if refused else "compliance"
        out.append(Labelled(row_id, row["objective"], row["assistant_response"], verdict, source, "pyrit"))
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
            out.append(Labelled(row["id"], row["prompt"], row["response"], row["verdict"], row["source"],
                                row["style"], row.get("harmful")))
        except (json.JSONDecodeError, KeyError) as err:
            raise VlsafeError(f"{path}: line {n}: not a labelled row ({err})") from None
        if out[-1].verdict not in VERDICTS:
            raise VlsafeError(f"{path}: line {n}: verdict {out[-1].verdict!r} is not one of {', '.join(VERDICTS)}")
    return out


def all_rows() -> list[Labelled]:
    return pyrit_rows("refusal.csv") + pyrit_rows("refusal_extra.csv") + project_rows()
