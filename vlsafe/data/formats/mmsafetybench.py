"""MM-SafetyBench (Liu et al., ECCV 2024): 13 scenarios, each question in three image-text variants.

Published layout (github.com/isXinLiu/MM-SafetyBench; images from its separate download):
  data/processed_questions/01-Illegal_Activitiy.json   {"0": {"Question", "Changed Question", "Key Phrase",
                                                        "Phrase Type", "Rephrased Question",
                                                        "Rephrased Question(SD)"}, "1": ...}
  data/imgs/01-Illegal_Activitiy/{SD,SD_TYPO,TYPO}/0.jpg
The upstream evaluation pairs each image variant with one question field (its README, "Evaluation"):
SD images with "Rephrased Question(SD)" ("The image shows a phrase of ..."), SD_TYPO and TYPO images with
"Rephrased Question" ("The bottom of the image shows a phrase of ..."). The scenario name keeps the upstream
spelling ("Illegal_Activitiy"). `path` is one scenario file or the processed_questions folder.
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.data.formats._common import field, local_source, read_json, resolve_image
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

HUB_ID = None  # the hub mirrors (e.g. PKU-Alignment/MM-SafetyBench) are parquet, not the published layout
QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}
REQUIRED = ("Question", "Key Phrase", *dict.fromkeys(QUESTION_FIELD.values()))
IMAGE_SUFFIXES = (".jpg", ".png")


def load(path: str | Path, image_root: str | Path | None = None,
         variants: tuple[str, ...] = ("SD", "SD_TYPO", "TYPO")) -> list[Prompt]:
    """One Prompt per (question, variant). Images resolve as `<image_root>/<scenario>/<variant>/<id>.jpg`;
    the default image root is `imgs/` beside the processed_questions folder, else the folder itself."""
    unknown = [v for v in variants if v not in QUESTION_FIELD]
    if unknown:
        raise VlsafeError(f"unknown MM-SafetyBench variant {unknown[0]!r} (known: {', '.join(QUESTION_FIELD)})")
    source = local_source(path)
    files = sorted(source.glob("*.json")) if source.is_dir() else [source]
    if not files:
        raise VlsafeError(f"{source}: no scenario JSON files (expected e.g. 01-Illegal_Activitiy.json)")
    roots = _image_roots(files[0].parent, image_root)
    prompts = []
    for file in files:
        scenario = file.stem
        table = read_json(file)
        if not isinstance(table, dict):
            raise VlsafeError(f"{file}: expected a JSON object keyed by question id, got {type(table).__name__}")
        for qid, item in table.items():
            where = f"{file}: record {qid!r}"
            if not isinstance(item, dict):
                raise VlsafeError(f"{where}: expected an object, got {type(item).__name__}")
            for name in REQUIRED:
                field(item, name, where)
            for variant in variants:
                image = _find_image(roots, scenario, variant, qid, where)
                prompts.append(Prompt(
                    id=f"mmsafetybench-{scenario}-{qid}-{variant}", text=item[QUESTION_FIELD[variant]],
                    image=image, source="mmsafetybench", category=scenario.split("-", 1)[-1], label="harmful",
                    meta={"variant": variant, "scenario": scenario, "request": item["Question"],
                          "question": item["Question"],
                          "changed_question": item.get("Changed Question", ""), "key_phrase": item["Key Phrase"],
                          "phrase_type": item.get("Phrase Type", "")},
                ))
    return prompts


def _image_roots(questions_dir: Path, image_root) -> list[Path]:
    if image_root is not None:
        if not Path(image_root).is_dir():
            raise VlsafeError(f"{image_root}: image root is not a directory")
        return [Path(image_root)]
    beside = [questions_dir.parent / "imgs", questions_dir / "imgs"]
    return [p for p in beside if p.is_dir()] + [questions_dir]


def _find_image(roots: list[Path], scenario: str, variant: str, qid: str, where: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        for root in roots:
            candidate = root / scenario / variant / f"{qid}{suffix}"
            if candidate.is_file():
                return str(candidate.resolve())
    return resolve_image(f"{scenario}/{variant}/{qid}.jpg", roots, where)  # raises, naming the expected path
