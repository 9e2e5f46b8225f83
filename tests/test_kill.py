"""kill -9 anywhere: `vlsafe train`, `vlsafe eval`, `vlsafe merge` and `vlsafe study` (pico) are SIGKILLed at
seeded random moments and rerun; the end result equals an uninterrupted run and no output looks complete before it
is.

`make test` delivers a few kills per command; `make test-long` sets VLSAFE_KILLS and VLSAFE_KILL_SEEDS for a longer
campaign. The harness is tests/killharness.py; a new command is one more KillCase below. The study's campaign is in
tests/test_study.py, beside the other tests that read its pico reference run (one file runs on one test worker).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from killharness import SEEDS, KillCase, campaign, same_files, same_json
from vlsafe.cli import main
from vlsafe.io import verify_model_dir

KILLS = int(os.environ.get("VLSAFE_KILLS", "2"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A pico VLM@0, a second one to merge with, six image conversations, a tiny eval suite and the configs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("kill")
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(root / "vlm0"), "--seed", "0"]) == 0
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(root / "vlm1"), "--seed", "1"]) == 0
    (root / "images").mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue"] * 2):
        Image.new("RGB", (32, 32), {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}[colour]
                  ).save(root / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"{colour.title()}."}]})
    (root / "data.json").write_text(json.dumps(records))
    (root / "train.yaml").write_text(yaml.safe_dump({
        "stage": "full", "model": str(root / "vlm0"), "data": str(root / "data.json"), "out": "set-on-command-line",
        "lr": 3e-3, "batch_size": 2, "max_steps": 8, "save_every": 2, "warmup_ratio": 0.0, "seed": 0}))
    (root / "suite.yaml").write_text(yaml.safe_dump({
        "max_new_tokens": 6, "judges": ["refusal-patterns"],
        "entries": [{"benchmark": "harmbench", "sample": 3, "conditions": ["text", "blank"]},
                    {"benchmark": "text_helpfulness", "sample": 3}]}))
    (root / "merge.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(root / "vlm0"), "parameters": {"lambda": 0.7},
        "models": [{"model": str(root / "vlm1"), "parameters": {"weight": 0.5}}]}))
    return root


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.allclose(left[name], right[name], atol=1e-6, rtol=0), name


def _train_compare(reference: Path, folder: Path) -> None:
    _same_weights(reference / "run" / "final", folder / "run" / "final")
    steps = [json.loads(line)["step"] for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps  # every step logged once, none lost or repeated
    for step in sorted((folder / "run" / "checkpoints").glob("step-*")):
        verify_model_dir(step)  # every checkpoint under its final name is whole and matches its content hash


def _eval_compare(reference: Path, folder: Path) -> None:
    same_json(reference / "eval" / "results.json", folder / "eval" / "results.json")
    assert (reference / "eval" / "samples.jsonl").read_text() == (folder / "eval" / "samples.jsonl").read_text()


def _merge_compare(reference: Path, folder: Path) -> None:
    same_files(reference / "merged", folder / "merged", "*.safetensors")
    same_json(reference / "merged" / "merge_manifest.json", folder / "merged" / "merge_manifest.json")
    verify_model_dir(folder / "merged")


def cases(work: Path) -> dict[str, KillCase]:
    return {
        "train": KillCase("train", lambda f: ["train", str(work / "train.yaml"), f"out={f / 'run'}", "--no-progress"],
                          done="run/final", compare=_train_compare, resumable=True),
        "eval": KillCase("eval", lambda f: ["eval", "--model", str(work / "vlm0"), "--suite", str(work / "suite.yaml"),
                                            "--out", str(f / "eval"), "--cache", str(f / "cache.sqlite")],
                         done="eval/results.json", compare=_eval_compare, outputs=("eval",)),
        "merge": KillCase("merge", lambda f: ["merge", str(work / "merge.yaml"), "--out", str(f / "merged")],
                          done="merged/vlsafe.json", compare=_merge_compare, outputs=("merged",)),
    }


@pytest.mark.parametrize("command", ["train", "eval", "merge"])
def test_killed_runs_finish_with_the_results_of_an_uninterrupted_run(command, work, tmp_path):
    case = cases(work)[command]
    reference = None
    total = 0
    for seed in SEEDS:
        result = campaign(case, tmp_path / command, KILLS, seed, reference)
        reference = tmp_path / command / "reference"
        total += result.kills
    assert total >= 1, f"{command}: every run finished before its kill time; nothing was tested"
    print(f"{command}: {total} SIGKILLs survived over seeds {SEEDS}")
