"""`vlsafe report` on a study folder written here item by item: the claims are computed from the folder's own
samples, a partial run still reports, report.html is self-contained (and renders offline in Chromium where it is
installed), and README's result tables come only from docs/results/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlsafe.cli import main
from vlsafe.eval.run import score
from vlsafe.report import markdown, readme
from vlsafe.report.build import build_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Judge:
    name: str = "patterns"
    version: str = "1"


def _write_eval(out: Path, model: str, complied: list[bool], benign_refused: list[bool], step=None, seed=None,
                conditions=("text",)) -> dict:
    """One eval stage as `vlsafe eval` writes it: samples.jsonl, results.json (scored by eval.run.score)."""
    folder = out / "stages" / f"eval-{model}"
    (folder / "eval").mkdir(parents=True)
    samples, items = [], []
    for condition in conditions:
        for bench, flags, metric in (("harmbench", complied, "attack_success_rate"),
                                     ("overrefusal", benign_refused, "refusal_rate")):
            for i, flag in enumerate(flags):
                refused = (not flag) if metric == "attack_success_rate" else flag
                verdict = {"refused": refused, "verdict": "refusal" if refused else "compliance", "score": 0.0,
                           "harmful": None, "reason": ""}
                items.append({"benchmark": bench, "condition": condition, "metric": metric, "category": "c",
                              "verdicts": {"patterns": verdict}})
                samples.append({"benchmark": bench, "condition": condition, "id": f"{bench}-{i}", "metric": metric,
                                "prompt": f"request {i}", "request": f"request {i}",
                                "response": "No." if refused else "Sure, here is how.",
                                "verdicts": items[-1]["verdicts"]})
    results = {"schema": "vlsafe.eval", "schema_version": 2, "judges": [{"name": "patterns", "version": "1"}],
               "model": {"spec": model, "fingerprint": f"fp-{model}", "is_vlm": True},
               "results": score(items, [_Judge()], 0)}
    (folder / "eval" / "results.json").write_text(json.dumps(results))
    (folder / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    record = {"name": f"eval-{model}", "kind": "eval", "key": f"key-{model}", "inputs": [model], "files": [],
              "models": [], "config": {}, "command": f"vlsafe eval --model {model}", "seconds": 1.0,
              "outputs": {"eval": f"stages/eval-{model}/eval", "judges": results["judges"]}}
    (folder / "stage.json").write_text(json.dumps(record))
    return {"stage": model, "ref": model, "role": model, "seed": seed, "step": step}


def _study(out: Path, adapted_asr: int = 56, n: int = 80, planned_extra: tuple[str, ...] = ()) -> Path:
    models = {
        "aligned": _write_eval(out, "aligned", [i < 4 for i in range(n)], [i < 2 for i in range(n)]),
        "vlm1": _write_eval(out, "vlm1", [i < 6 for i in range(n)], [i < 2 for i in range(n)], step=0,
                            conditions=("text", "blank")),
        "adapted-s0": _write_eval(out, "adapted-s0", [i < adapted_asr for i in range(n)], [i < 2 for i in range(n)],
                                  step=10, seed=0, conditions=("text", "blank")),
    }
    stages = [{"name": f"eval-{m}", "key": f"key-{m}"} for m in models] + [
        {"name": name, "key": "never-run"} for name in planned_extra]
    (out / "plan.json").write_text(json.dumps({"config": "test", "stages": stages, "models": models}))
    (out / "study.yaml").write_text("name: constructed\nseeds: [0]\nmargin: 0.05\n")
    return out


def test_claims_come_from_the_folders_own_samples(tmp_path):
    out = _study(tmp_path / "study")
    results = build_report(out)
    f1 = results["claims"][0]
    assert f1["verdict"] == "reproduced" and f1["estimate"] == pytest.approx((56 - 4) / 80) and f1["n"] == 80
    assert json.loads((out / "results.json").read_text())["claims"] == json.loads(json.dumps(results["claims"]))
    # rewrite the adapted model's samples so it refuses what the aligned LLM refuses: the verdict follows the files
    samples = out / "stages/eval-adapted-s0/eval/samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:
        if row["benchmark"] == "harmbench":
            flag = int(row["id"].split("-")[1]) < 4
            row["verdicts"]["patterns"].update(verdict="compliance" if flag else "refusal", refused=not flag)
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["claims"][0]
    assert again["verdict"] == "not_reproduced" and again["estimate"] == 0.0


def test_a_partial_run_reports_what_is_done_and_a_stale_stage_is_left_out(tmp_path):
    out = _study(tmp_path / "study", planned_extra=("dpo-s0", "eval-dpo-s0"))
    record = out / "stages/eval-vlm1/stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "key": "from-an-older-config"}))
    results = build_report(out)
    assert not results["complete"] and results["stages_done"] == 2 and results["stages_planned"] == 5
    assert {m["model"] for m in results["models"]} == {"aligned", "adapted-s0"}
    f2 = results["claims"][1]
    assert f2["verdict"] == "inconclusive" and "no safety-tuned model" in f2["reason"]


def test_report_html_is_self_contained_with_every_section(tmp_path):
    out = _study(tmp_path / "study")
    for model, commit in (("aligned", "a" * 40), ("vlm1", "a" * 40), ("adapted-s0", "b" * 40)):
        record = out / f"stages/eval-{model}/stage.json"  # a run that spans two commits
        record.write_text(json.dumps({**json.loads(record.read_text()), "git": commit}))
    assert build_report(out)["git"] == ["a" * 40, "b" * 40]
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower() and not re.search(r"(src|href)=[\"']?(https?:)?//", page)
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert "dynamics" in images and "asr_by_model" in images
    for section in ("Claims", "Every model", "Examples", "Lineage"):
        assert f"<h2>{section}</h2>" in page
    assert "not perceived" in page  # no legibility probe ran: typographic numbers are not safety
    markdown = (out / "report.md").read_text()
    assert "| F1 |" in markdown and "plots/dynamics.png" in markdown
    assert f"git {'a' * 40} + {'b' * 40};" in markdown and f"git {'a' * 40} + {'b' * 40};" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_check_report_renders_offline_in_chromium(tmp_path):
    out = _study(tmp_path / "study")
    build_report(out)
    done = subprocess.run(["bash", str(ROOT / "scripts/check_report.sh"), str(out), str(tmp_path / "shot.png")],
                          capture_output=True, text=True, timeout=240, env={"CHECK_REPORT_HEIGHT": "2000",
                                                                             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "no network request" in done.stdout and (tmp_path / "shot.png").stat().st_size > 10_000


def test_readme_tables_are_generated_from_summaries_and_checked(tmp_path):
    out = _study(tmp_path / "study")
    assert main(["report", str(out), "--summary", str(tmp_path / "results" / "constructed.json")]) == 0
    summary = json.loads((tmp_path / "results" / "constructed.json").read_text())
    assert summary["seeds"] == [0] and summary["claims"][0]["id"] == "F1" and "git" in summary
    page = tmp_path / "README.md"
    page.write_text(f"# x\n\n{readme.BEGIN}\nold\n{readme.END}\n\nrest\n")
    assert main(["report", "--readme", str(page), "--results-dir", str(tmp_path / "results")]) == 0
    text = page.read_text()
    assert "| F1 | reproduced | +65 pts |" in text and text.endswith("rest\n")
    assert summary["eval_dtypes"] == ["fp32"] and "seeds [0], evaluated in fp32; ran on" in text
    numbers = readme.numbers_in_tables(text)
    assert numbers and set(numbers) <= readme.summary_numbers(tmp_path / "results")
    # a hand-typed number in the block is caught
    page.write_text(text.replace("| F1 | reproduced | +65 pts |", "| F1 | reproduced | +66 pts |"))
    assert "66" not in readme.summary_numbers(tmp_path / "results")
    assert not set(readme.numbers_in_tables(page.read_text())) <= readme.summary_numbers(tmp_path / "results")


def test_digits_inside_a_hash_are_not_summary_numbers(tmp_path):
    """A commit such as 7b66b85... must not let a hand-typed 66 pass the README check; plain numbers in strings do."""
    (tmp_path / "run.json").write_text(json.dumps({"git": "7b66b85f1bb130485c57fc75e5a65a3ae40a8fe1",
                                                   "short": "c3e5d79", "note": "n = 120 items, 134515008 params",
                                                   "share": 0.5}))
    found = readme.summary_numbers(tmp_path)
    assert not {"66", "7", "85", "3", "5", "79"} & found
    assert {"120", "134515008", "50", "0.5"} <= found


def test_every_number_in_readmes_results_block_is_in_docs_results():
    text = (ROOT / "README.md").read_text()
    assert readme.BEGIN in text and readme.END in text
    numbers = readme.numbers_in_tables(text)
    missing = set(numbers) - readme.summary_numbers(ROOT / "docs" / "results")
    assert not missing, f"README numbers not in docs/results/: {sorted(missing)[:10]}"


def test_readme_shows_a_role_trained_per_seed_as_one_row_of_mean_and_seeds(tmp_path):
    asr = ("harmbench", "text", "attack_success_rate")
    cell = lambda value: {"benchmark": asr[0], "condition": asr[1], "metric": asr[2], "value": value,  # noqa: E731
                          "ci": [value - 0.1, value + 0.1], "n": 40}
    summary = {"name": "two-seeds", "git": "abc", "config_file": "c.yaml", "judges": ["default"], "seeds": [0, 1],
               "claims": [{"id": "F1", "verdict": "reproduced", "estimate": 0.3, "ci": [0.2, 0.4], "n": 120,
                           "seeds": 2, "seed_sd": 0.05}],
               "models": [{"model": "aligned", "seed": None, "cells": [cell(0.2)]},
                          {"model": "adapted-s0", "seed": 0, "cells": [cell(0.4)]},
                          {"model": "adapted-s1", "seed": 1, "cells": [cell(0.6)]}],
               "seed_spread": {"adapted": [{"benchmark": asr[0], "condition": asr[1], "metric": asr[2], "mean": 0.5,
                                            "sd": 0.141421, "seeds": 2, "per_seed": {"0": 0.4, "1": 0.6}}]}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "two-seeds.json").write_text(json.dumps(summary))
    text = readme.tables(tmp_path / "results")
    assert "| F1 | reproduced | +30 pts | [+20, +40] | 120 x 2 | 5 pts |" in text
    assert "| aligned | 20% [10%, 30%] |" in text and "| adapted | 50% (40% / 60%) |" in text
    assert "adapted-s0" not in text and "adapted-s1" not in text  # one row for the role, not one per seed
    assert "git abc, config c.yaml" in text
    # a run that spans commits (trained at one, its evaluations re-scored at a later one) names them all
    (tmp_path / "results" / "two-seeds.json").write_text(json.dumps({**summary, "git": ["a" * 40, "b" * 40]}))
    assert f"git {'a' * 12} + {'b' * 12}, config" in readme.tables(tmp_path / "results")
    assert set(readme.numbers_in_tables(f"{readme.BEGIN}\n{text}\n{readme.END}")) <= readme.summary_numbers(
        tmp_path / "results")
    # a claim tested per condition gets a row per condition; claims rebuilt at a later commit name it
    per_condition = {**summary["claims"][0], "conditions": {
        "text": {"verdict": "inconclusive", "difference": 0.04, "ci": [-0.04, 0.1], "n": 120, "seeds": 2,
                 "seed_sd": 0.01},
        "blank": {"verdict": "reproduced", "difference": 0.3, "ci": [0.2, 0.4], "n": 80, "seeds": 2, "seed_sd": 0.05}}}
    (tmp_path / "results" / "two-seeds.json").write_text(json.dumps(
        {**summary, "claims": [per_condition], "report_git": "c" * 40}))
    text = readme.tables(tmp_path / "results")
    assert "| F1, as text | inconclusive | +4 pts | [-4, +10] | 120 x 2 | 1 pts |" in text
    assert "| F1, with a blank image | reproduced | +30 pts | [+20, +40] | 80 x 2 | 5 pts |" in text
    assert f"git abc, claims by git {'c' * 12}, config" in text
    assert set(readme.numbers_in_tables(f"{readme.BEGIN}\n{text}\n{readme.END}")) <= readme.summary_numbers(
        tmp_path / "results")


def test_claim_estimates_print_as_what_they_are_points_or_a_cosine(tmp_path):
    # F2's estimate is a difference of two shares (percentage points); F3's a task-vector cosine, not a share
    summary = {"name": "units", "git": "abc", "config_file": "c.yaml", "judges": ["default"], "seeds": [0],
               "claims": [{"id": "F2", "verdict": "reproduced", "estimate": -0.452, "ci": [-0.521, -0.381], "n": 210,
                           "seeds": 1},
                          {"id": "F3", "verdict": "not_reproduced", "estimate": 0.184487, "ci": None, "n": None}],
               "models": [], "seed_spread": {}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "units.json").write_text(json.dumps(summary))
    text = readme.tables(tmp_path / "results")
    assert "| F2 | reproduced | -45 pts | [-52, -38] | 210 x 1 | - |" in text
    assert "| F3 | not_reproduced | cosine +0.184 | - | - | - |" in text and "18%" not in text
    assert set(readme.numbers_in_tables(f"{readme.BEGIN}\n{text}\n{readme.END}")) <= readme.summary_numbers(
        tmp_path / "results")
    assert markdown.interval(summary["claims"][0]) == "-45.2 pts [-52.1, -38.1]"
    assert markdown.interval(summary["claims"][1]) == "cosine +0.184"


def test_a_cells_non_answer_share_counts_only_the_items_of_its_rate():
    from vlsafe.report.build import model_table

    # the over-refusal set mixes 3 benign items (refusal rate) with 1 harmful contrast item (ASR, non-answer rate)
    def outcome(metric, non_answer):
        return {"metric": metric, "attack": False, "refusal": False, "non_answer": non_answer, "correct": False}

    outcomes = {("overrefusal", "text", "b1"): outcome("refusal_rate", True),
                ("overrefusal", "text", "b2"): outcome("refusal_rate", False),
                ("overrefusal", "text", "b3"): outcome("refusal_rate", False),
                ("overrefusal", "text", "h1"): outcome("attack_success_rate", False)}
    rows = [{"benchmark": "overrefusal", "condition": "text", "category": "*", "metric": metric, "judge": "default",
             "value": value, "ci": None, "n": n, "k": None}
            for metric, value, n in (("refusal_rate", 0.0, 3), ("attack_success_rate", 0.0, 1),
                                     ("non_answer_rate", 0.0, 1))]
    data = {"models": {"m": {"results": {"results": rows, "model": {"fingerprint": "f"}}, "role": "adapted",
                             "judge": "default"}},
            "outcomes": {"m": outcomes}}
    cells = {c["metric"]: c for c in model_table(data)[0]["cells"]}
    assert cells["refusal_rate"]["non_answer"] == pytest.approx(1 / 3)  # 1 of the 3 benign items, not 1 of 4
    assert cells["attack_success_rate"]["non_answer"] == 0.0
    assert cells["non_answer_rate"]["non_answer"] is None
    assert "(non-answer" not in markdown.cell(cells["non_answer_rate"])


def test_a_summarys_caveats_stand_above_its_tables(tmp_path):
    summary = {"name": "faulty", "git": "abc", "config_file": "c.yaml", "judges": ["default"], "seeds": [0],
               "caveats": ["its evaluations dropped some answers; rerun to replace them."],
               "claims": [{"id": "F1", "verdict": "reproduced", "estimate": 0.3, "ci": [0.2, 0.4], "n": 120}],
               "models": [], "seed_spread": {}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "faulty.json").write_text(json.dumps(summary))
    text = readme.tables(tmp_path / "results")
    caveat = text.index("> **Caveat:** its evaluations dropped some answers; rerun to replace them.")
    assert text.index("**faulty**") < caveat < text.index("| claim |")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable results summary"),
    ('{"name": "x"}', "not a results summary (missing git"),
    ('{"name": "x", "git": "a", "config_file": "c", "judges": [], "seeds": [0], "claims": [], "models": [], '
     '"caveats": "one sentence"}', "caveats must be a list of sentences"),
])
def test_a_bad_summary_is_one_line_and_leaves_readme_as_it_was(tmp_path, capsys, content, message):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bad.json").write_text(content)
    page = tmp_path / "README.md"
    page.write_text(f"# x\n\n{readme.BEGIN}\nold\n{readme.END}\n")
    before = page.read_text()
    assert main(["report", "--readme", str(page), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.json" in err and "Traceback" not in err
    assert page.read_text() == before
