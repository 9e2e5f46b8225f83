"""MME (Fu et al., 2023): yes/no questions over 14 perception and cognition subtasks, two per image.

Published as the folder `MME_Benchmark_release_version/` with one folder per subtask, in one of two shapes:
  <subtask>/images/<stem>.jpg + <subtask>/questions_answers_YN/<stem>.txt   (artwork, celebrity, landmark, ...)
  <subtask>/<stem>.jpg + <subtask>/<stem>.txt                              (existence, count, OCR, ...)
Each .txt holds lines `question<TAB>Yes|No` (usually one Yes and one No question for the same image).
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import local_source, resolve_image
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = None  # the hub copy (lmms-lab/MME) is parquet, not the release folder
ANSWERS = ("Yes", "No")
QA_DIR = "questions_answers_YN"


def load(path: str | Path, image_root=None) -> list[Prompt]:
    """`path` is the release folder (or one subtask folder); images sit beside their questions, so
    `image_root` is not used."""
    root = local_source(path)
    if not root.is_dir():
        raise VlsafeError(f"{root}: expected the MME release folder (MME_Benchmark_release_version)")
    files = sorted(p for p in root.rglob("*.txt") if p.parent != root)
    files = files or sorted(root.glob("*.txt"))  # a single subtask folder
    if not files:
        raise VlsafeError(f"{root}: no question files (<subtask>/*.txt or <subtask>/{QA_DIR}/*.txt)")
    prompts = []
    for file in files:
        in_qa_dir = file.parent.name == QA_DIR
        subtask_dir = file.parent.parent if in_qa_dir else file.parent
        image_dir = subtask_dir / "images" if in_qa_dir else file.parent
        subtask = subtask_dir.name
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise VlsafeError(f"{file}: not UTF-8 text") from None
        image = None
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"{file}: line {number}"
            cells = text.rstrip("\n").split("\t")
            if len(cells) != 2 or not cells[0].strip():
                raise VlsafeError(f"{where}: expected 'question<TAB>Yes|No', got {len(cells)} field(s)")
            question, answer = cells[0].strip(), cells[1].strip()
            if answer not in ANSWERS:
                raise VlsafeError(f"{where}: answer is {answer!r} (expected Yes or No)")
            image = image or resolve_image(file.stem, [image_dir], where, try_suffixes=True)
            prompts.append(Prompt(
                id=f"mme-{subtask}-{file.stem}-{number}", text=question, image=image, source="mme",
                category=subtask, label="benign", answer=answer, meta={"image_stem": file.stem},
            ))
    return prompts
