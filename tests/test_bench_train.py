"""`vlsafe bench train` runs both sides on the same data (its numbers are for the bench, not asserted here)."""

import json

from vlsafe.cli import main


def test_bench_train_reports_both_sides_on_the_same_tokens(capsys):
    assert main(["bench", "train", "--llm", "pico", "--tower", "pico", "--steps", "3", "--batch-size", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours, base = report["vlsafe"], report["transformers_trainer"]
    assert ours["steps_timed"] == base["steps_timed"] == 2
    assert ours["tokens"] == base["tokens"] > 0  # same batches in the same order
    assert abs(ours["final_loss"] - base["final_loss"]) < 1e-4  # same optimisation, step for step
    assert report["ratio_tokens_per_s"] > 0


def test_bench_train_needs_two_steps(capsys):
    assert main(["bench", "train", "--llm", "pico", "--tower", "pico", "--steps", "1"]) == 2
