"""`vlsafe eval compare`: paired differences between evaluation runs, on constructed result directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlsafe.cli import main
from vlsafe.errors import VlsafeError
from vlsafe.eval.compare import compare
from vlsafe.eval.metrics import mcnemar


def _run(folder: Path, asr: list[bool], over: list[bool], correct: list[bool], extra_cells=(),
         prompt=lambda i: f"request {i}", verdict_key=False) -> Path:
    """An eval output dir: harmbench/text items (complied = True), overrefusal/text (refused = True),
    text_helpfulness/text (correct = True); judge `default`."""
    folder.mkdir(parents=True)
    rows = []
    for i, complied in enumerate(asr):
        v = {"refused": not complied, "score": 0.0, "harmful": None, "reason": ""}
        if verdict_key:
            v["verdict"] = "compliance" if complied else ("non_answer" if i % 5 == 0 else "refusal")
            v["refused"] = v["verdict"] == "refusal"
        rows.append({"benchmark": "harmbench", "condition": "text", "id": f"h{i}", "label": "harmful",
                     "prompt": prompt(i), "metric": "attack_success_rate", "verdicts": {"default": v}})
    for i, refused in enumerate(over):
        rows.append({"benchmark": "overrefusal", "condition": "text", "id": f"o{i}", "label": "benign",
                     "prompt": f"benign {i}", "metric": "refusal_rate",
                     "verdicts": {"default": {"refused": refused, "score": 0.0, "harmful": None, "reason": ""}}})
    for i, ok in enumerate(correct):
        rows.append({"benchmark": "text_helpfulness", "condition": "text", "id": f"q{i}", "label": "benign",
                     "prompt": f"question {i}", "metric": "accuracy", "correct": ok, "verdicts": {}})
    for benchmark, condition in extra_cells:
        rows.append({"benchmark": benchmark, "condition": condition, "id": "x", "label": "harmful", "prompt": "x",
                     "metric": "attack_success_rate", "verdicts": {"default": {"refused": True}}})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps({"schema": "vlsafe.eval", "judges": [{"name": "default"}],
                                                          "results": []}))
    return folder


A_ASR = [i < 10 for i in range(40)]                 # 10 / 40 complied
B_ASR = [i < 6 or 20 <= i < 34 for i in range(40)]  # 20 / 40: 6 shared, 4 only A, 14 only B


def test_paired_difference_per_benchmark_condition_and_metric(tmp_path):
    a = _run(tmp_path / "a", A_ASR, [True] * 3 + [False] * 17, [True] * 8 + [False] * 2,
             extra_cells=[("harmbench", "typo")])
    b = _run(tmp_path / "b", B_ASR, [True] * 3 + [False] * 17, [True] * 4 + [False] * 6)
    result = compare([a], [b])
    rows = {(r["benchmark"], r["metric"]): r for r in result["rows"]}
    asr = rows["harmbench", "attack_success_rate"]
    assert (asr["n"], asr["a"], asr["b"], asr["difference"]) == (40, 0.25, 0.5, 0.25)
    assert (asr["a_only"], asr["b_only"]) == (4, 14)
    assert asr["p_value"] == mcnemar(A_ASR, B_ASR)["p_value"] < 0.05
    assert 0 < asr["ci"][0] < 0.25 < asr["ci"][1] and asr["better"] == "a"  # lower ASR is better
    same = rows["overrefusal", "refusal_rate"]
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["better"] is None
    acc = rows["text_helpfulness", "accuracy"]
    assert acc["difference"] == -0.4 and acc["higher_is_better"] and acc["label"] == "accuracy"
    assert result["judge"] == "default" and result["items"]["matched"] == 70
    assert result["unpaired"] == ["harmbench/typo"]  # only A has it: left out, said so
    assert compare([a], [b])["rows"] == result["rows"]  # seeded bootstrap
    # one run a side: how many items kept their verdict (ASR 22 of 40, over-refusal 20 of 20) and correctness (6/10)
    agreed = result["agreement"]
    assert (agreed["verdicts"]["same"], agreed["verdicts"]["n"]) == (42, 60) and agreed["correct"]["share"] == 0.6
    assert agreed["responses"] == {"same": 0, "n": 0, "share": None}  # these samples carry no answers


def test_agreement_counts_three_way_verdicts_and_identical_answers(tmp_path):
    a = _run(tmp_path / "a", A_ASR, [], [], verdict_key=True)
    b = _run(tmp_path / "b", A_ASR, [], [], verdict_key=True)
    rows = [json.loads(line) for line in (b / "samples.jsonl").read_text().splitlines()]
    rows[0]["verdicts"]["default"] = {"verdict": "non_answer", "refused": False}  # complied in A: another verdict
    for i, row in enumerate(rows):
        row["response"] = f"answer {i}" if i != 1 else "other words"
    (b / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a_rows = [{**json.loads(line), "response": f"answer {i}"}
              for i, line in enumerate((a / "samples.jsonl").read_text().splitlines())]
    (a / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a_rows))
    agreed = compare([a], [b])["agreement"]
    assert (agreed["verdicts"]["same"], agreed["verdicts"]["n"]) == (39, 40)
    assert (agreed["responses"]["same"], agreed["responses"]["n"]) == (39, 40) and agreed["correct"]["n"] == 0


def test_several_seeds_report_the_seed_spread_beside_the_item_ci(tmp_path):
    a = _run(tmp_path / "a", A_ASR, [False] * 10, [True] * 5)
    seeds = [[i < k for i in range(40)] for k in (16, 20, 24)]
    for n, outcomes in enumerate(seeds):
        _run(tmp_path / f"b-seed{n}", outcomes, [False] * 10, [True] * 5)
    result = compare([a], [str(tmp_path / "b-seed*")])  # a glob
    asr = next(r for r in result["rows"] if r["metric"] == "attack_success_rate")
    assert result["seeds"] == {"a": 1, "b": 3} and asr["seeds"] == 3
    assert asr["per_seed"] == [0.15, 0.25, 0.35] and asr["seed_sd"] == pytest.approx(0.1)
    assert result["agreement"] is None  # item agreement is between two runs, not two sides of seeds
    one = compare([a], [tmp_path / "b-seed1"])
    asr_one = next(r for r in one["rows"] if r["metric"] == "attack_success_rate")
    assert asr_one["seed_sd"] is None
    # seeds widen the interval: the seed-to-seed spread is in it
    assert asr["ci"][1] - asr["ci"][0] > asr_one["ci"][1] - asr_one["ci"][0]


def test_three_way_verdicts_give_asr_by_compliance_and_a_non_answer_rate(tmp_path):
    a = _run(tmp_path / "a", A_ASR, [], [], verdict_key=True)
    b = _run(tmp_path / "b", B_ASR, [], [], verdict_key=True)
    rows = {r["metric"]: r for r in compare([a], [b])["rows"]}
    assert rows["attack_success_rate"]["a"] == 0.25
    non_answer_a = sum(1 for i, c in enumerate(A_ASR) if not c and i % 5 == 0) / 40
    assert rows["non_answer_rate"]["a"] == non_answer_a and rows["non_answer_rate"]["label"] == "non-answer rate"


def test_items_that_do_not_pair_are_refused(tmp_path, capsys):
    a = _run(tmp_path / "a", A_ASR, [], [])
    other = _run(tmp_path / "other", A_ASR[:10], [], [])  # 10 of A's 40 items
    with pytest.raises(VlsafeError, match="harmbench/text: the runs share 10 of up to 40 items"):
        compare([a], [other])
    reworded = _run(tmp_path / "reworded", A_ASR, [], [], prompt=lambda i: f"changed {i}")
    with pytest.raises(VlsafeError, match="shown different prompts"):
        compare([a], [reworded])
    assert main(["eval", "compare", str(a), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "share 10 of up to 40 items" in err and len(err.splitlines()) == 1
    assert main(["eval", "compare", str(a), str(tmp_path / "nothing")]) == 2
    assert "results.json: not found" in capsys.readouterr().err
    assert main(["eval", "compare", str(a), str(a), "--judge", "llm"]) == 2
    assert "no verdict of judge 'llm'" in capsys.readouterr().err
    broken = _run(tmp_path / "broken", A_ASR, [], [])
    rows = (broken / "samples.jsonl").read_text().splitlines()
    rows[3] = json.dumps({**json.loads(rows[3]), "verdicts": {"default": {"score": 0.5}}})
    (broken / "samples.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["eval", "compare", str(a), str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "item 'h3': judge 'default' gave neither `verdict` nor `refused`" in err[0]


def test_cli_prints_a_table_or_json(tmp_path, capsys):
    a = _run(tmp_path / "a", A_ASR, [False] * 4, [True] * 4)
    b1 = _run(tmp_path / "b1", B_ASR, [False] * 4, [True] * 4)
    b2 = _run(tmp_path / "b2", A_ASR, [False] * 4, [True] * 4)
    assert main(["eval", "compare", "--a", str(a), "--b", str(b1), "--b", str(b2), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == {"a": 1, "b": 2} and len(result["rows"]) == 3
    assert main(["eval", "compare", str(a), str(b1)]) == 0
    out = capsys.readouterr().out
    assert "40 items" not in out and "48 items matched" in out
    assert "harmbench" in out and "B-A +0.250" in out and "p=" in out
    assert "agreement: verdicts 26/44 (59.1%), correct 4/4 (100.0%), responses 0/0\n" in out
