"""Off a terminal (a log file, a batch job) the long loops say where they are: a plain line at most every
LINE_EVERY_S seconds and one at the end, through the real training and evaluation entry points; a short loop says
nothing."""

from __future__ import annotations

import json
import re

import yaml

from vlsafe import progress
from vlsafe.cli import main


def test_a_loop_shorter_than_the_interval_prints_nothing(capsys):
    with progress.Steps("train", total=5) as bar:
        for step in range(1, 6):
            bar.update(step, info=f"loss {1 / step:.2f}")
    assert capsys.readouterr().err == ""


def test_lines_give_the_count_the_elapsed_time_and_an_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    with progress.Steps("stage1", total=4, completed=1) as bar:  # resumed at step 1
        for step in range(2, 5):
            bar.update(step, info="loss 0.50")
    lines = capsys.readouterr().err.splitlines()
    assert [re.match(r"\s+stage1: (\d)/4 steps", line).group(1) for line in lines] == ["2", "3", "4"]
    assert all("ETA" in line for line in lines[:-1]) and "ETA" not in lines[-1]  # nothing left at the end
    assert lines[-1].endswith("loss 0.50")
    bar.advance(0)  # a late call that adds nothing (a cache hit count of 0) does not repeat the last line
    assert capsys.readouterr().err == ""


def test_inside_a_study_stage_lines_name_the_stage_and_the_work(capsys, monkeypatch, tmp_path):
    """The study runs each stage inside `progress.scope(stage)`: a training loop's line reads `stage2-s0 (full)`."""
    from vlsafe.study import stages

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)

    def fake_training(ctx, config, folder):
        with progress.Steps("full", total=2) as bar:
            bar.advance(2)
        return {}

    monkeypatch.setitem(stages.RUNNERS, "train", fake_training)
    stages.runner(stages.Context(out=tmp_path), "train", {})(tmp_path / "stage2-s0")
    assert re.match(r"\s+stage2-s0 \(full\): 2/2 steps", capsys.readouterr().err)
    with progress.Steps("full", total=1) as bar:  # outside a stage: the work's own name, as before
        bar.advance(1)
    assert re.match(r"\s+full: 1/1 steps", capsys.readouterr().err)


def test_disabled_prints_nothing(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    with progress.Steps("train", total=3, enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_training_and_evaluation_report_their_steps_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(tmp_path / "vlm0")]) == 0
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                 {"from": "gpt", "value": f"{i}."}]} for i in range(6)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"stage": "full", "model": str(tmp_path / "vlm0"),
                                      "data": [str(tmp_path / "data.json")], "out": str(tmp_path / "run"),
                                      "lr": 1e-3, "batch_size": 2, "max_steps": 3, "warmup_ratio": 0.0}))
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"full: 3/3 steps, \d+:\d\d  loss \d", err), err

    suite = tmp_path / "suite.yaml"
    suite.write_text("description: test\nseed: 0\nmax_new_tokens: 2\nentries:\n"
                     "  - {benchmark: text_helpfulness, sample: 5, conditions: [text]}\n")
    assert main(["eval", "--model", str(tmp_path / "vlm0"), "--suite", str(suite), "--out", str(tmp_path / "ev"),
                 "--judge", "refusal-patterns"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"generate: 5/5 items", err), err
