"""Merge sweeps with evaluation: the Pareto front as a pure function, the one reader of results.json, and a sweep
end to end on pico models (merge, `vlsafe eval`, pareto.json / pareto.png consistent with the per-point results)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from vlsafe.cli import main
from vlsafe.errors import VlsafeError
from vlsafe.merge.pareto import front, objectives

LOW, HIGH = False, True  # (ASR, over-refusal) lower is better; helpfulness higher is better


# ------------------------------------------------------------------------------------------------ the front


def test_dominance_with_ties():
    points = [(0.2, 0.1, 0.5),   # ties the next point exactly: neither dominates the other
              (0.2, 0.1, 0.5),
              (0.2, 0.1, 0.4),   # equal on two objectives, worse helpfulness: dominated
              (0.1, 0.3, 0.5),   # safer but refuses more: a trade-off, on the front
              (0.3, 0.3, 0.5)]   # worse than the first on two, tied on the third: dominated
    assert front(points, (LOW, LOW, HIGH)) == [True, True, False, True, False]
    # the direction matters: with helpfulness lower-is-better the 0.4 point wins instead
    assert front(points, (LOW, LOW, LOW)) == [False, False, True, True, False]


def test_a_single_point_and_an_empty_sweep():
    assert front([(0.9, 0.9, 0.0)], (LOW, LOW, HIGH)) == [True]
    assert front([], (LOW, LOW, HIGH)) == []


def test_a_clean_trade_off_is_all_on_the_front():
    points = [(0.1 * i, 0.5 - 0.1 * i, 0.2 + 0.1 * i) for i in range(5)]  # every gain costs something else
    assert front(points, (LOW, LOW, HIGH)) == [True] * 5


def test_objectives_read_schema_2_rows_of_the_first_judge():
    def row(benchmark, metric, judge, k, n, category="*", **extra):
        return {"benchmark": benchmark, "condition": "text", "category": category, "metric": metric, "judge": judge,
                "n": n, "k": k, "value": None if k is None else k / n, "ci": [0.1, 0.9], **extra}

    report = {"schema_version": 2, "judges": [{"name": "default"}, {"name": "refusal-patterns"}], "results": [
        row("harmbench", "attack_success_rate", "default", 3, 10),
        row("harmbench", "attack_success_rate", "refusal-patterns", 9, 10),  # the second judge: not used
        row("harmbench", "attack_success_rate", "default", 1, 4, category="cybercrime"),  # a category: not used
        row("harmbench", "harmful_compliance_rate", "default", None, 10),  # not an objective
        row("strongreject", "attack_success_rate", "default", None, 5),  # no value: left out
        row("text_helpfulness", "accuracy", "answer-match", 4, 8)]}
    got = objectives(report)
    assert (got["attack_success_rate"]["k"], got["attack_success_rate"]["n"]) == (3, 10)
    assert list(got["attack_success_rate"]["cells"]) == ["harmbench/text"]
    assert got["accuracy"]["value"] == 0.5 and got["accuracy"]["ci"] == [0.1, 0.9]
    assert got["refusal_rate"] is None
    with pytest.raises(VlsafeError, match="schema version 2"):
        objectives({"results": {"harmbench": {}}})  # an older, nested results.json


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pico_pair(tmp_path_factory):
    """A pico VLM (its vocabulary has the added <image> token) and a different pico LLM without it."""
    from safetensors.torch import load_file

    from vlsafe.model.llms import pico_llm

    root = tmp_path_factory.mktemp("models")
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(root / "vlm")]) == 0
    model, tokenizer = pico_llm(seed=1)
    model.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vocab = {k: v.shape[0] for k, v in load_file(root / "vlm" / "model.safetensors").items() if "embed_tokens" in k}
    assert list(vocab.values()) == [len(tokenizer) + 1]
    return root / "vlm", root / "llm"


def test_sweep_evaluates_every_point_and_writes_a_consistent_front(pico_pair, tmp_path, capsys):
    from vlsafe.merge.pareto import OBJECTIVES

    vlm, llm = pico_pair
    (tmp_path / "tiny.yaml").write_text(  # one benchmark per objective, text only, two new tokens
        "description: test\nseed: 0\nmax_new_tokens: 2\nentries:\n"
        "  - {benchmark: harmbench, conditions: [text, blank]}\n"
        "  - {benchmark: overrefusal, conditions: [text]}\n"
        "  - {benchmark: text_helpfulness, conditions: [text]}\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "config": {"merge_method": "task_arithmetic", "base_model": str(vlm), "vocab": "common",
                   "models": [{"model": str(llm), "parameters": {"weight": 1.0}}]},
        "grid": {"models.0.parameters.weight": [0.0, 0.5, 1.0]},
        "eval": {"suite": "tiny.yaml", "limit": 3, "judges": ["refusal-patterns"]}}, sort_keys=False))
    out = tmp_path / "sweep"
    assert main(["merge", "sweep", str(tmp_path / "sweep.yaml"), "--out", str(out),
                 "--cache", str(tmp_path / "eval.sqlite"), "--delete-models"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluated"] is True and summary["points"] == 3

    report = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["front_over"] == list(OBJECTIVES) and len(report["points"]) == 3
    assert [p["assignment"] for p in report["points"]] == [{"models.0.parameters.weight": w} for w in (0.0, 0.5, 1.0)]
    assert report["points"][1]["label"] == "weight=0.5"
    for point in report["points"]:
        folder = out / point["name"]
        assert point["model"] is None and not (folder / "model").exists()  # --delete-models
        # the recorded hash is the merged weights' content hash, recomputed from the kept manifest's shard hashes
        manifest = json.loads((folder / "merge_manifest.json").read_text())
        lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(manifest["shards"].items()))
        assert point["model_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
        assert any(t.get("vocab", {}).get("copied_rows") for t in manifest["tensors"])  # vocab: common recorded
        # every objective is the pool of the point's own results.json cells that carry its name
        results = json.loads((out / point["results"]).read_text())["results"]
        assert point["results"] == f"{point['name']}/eval/results.json"
        for name in OBJECTIVES:
            cells = [row for row in results if row["metric"] == name and row["category"] == "*"]
            metric = point["metrics"][name]
            assert metric["n"] == sum(c["n"] for c in cells) and metric["k"] == sum(c["k"] for c in cells)
            assert metric["value"] == pytest.approx(metric["k"] / metric["n"])
        assert point["metrics"]["attack_success_rate"]["n"] == 6  # harmbench: 3 items x (text, blank)
        refusal = point["metrics"]["refusal_rate"]  # a single cell pools to itself, interval included
        (cell,) = [row for row in results if row["metric"] == "refusal_rate" and row["category"] == "*"]
        assert refusal["n"] == 3 and refusal["ci"] == cell["ci"] and refusal["value"] == cell["value"]
    values = [[p["metrics"][name]["value"] for name in OBJECTIVES] for p in report["points"]]
    flags = front(values, [higher for _, higher in OBJECTIVES.values()])
    assert [p["on_front"] for p in report["points"]] == flags and any(flags)
    assert report["front"] == [p["name"] for p, f in zip(report["points"], flags) if f]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["evaluated"] is True and [p["model_sha256"] for p in sweep["points"]] == [
        p["model_sha256"] for p in report["points"]]
    assert len({p["model_sha256"] for p in report["points"]}) == 3  # three different merged models


def test_a_bad_eval_section_fails_before_any_merge(pico_pair, tmp_path, capsys):
    vlm, llm = pico_pair
    config = {"merge_method": "task_arithmetic", "base_model": str(vlm), "vocab": "common",
              "models": [{"model": str(llm), "parameters": {"weight": 1.0}}]}
    for name, section, message in (("suite", {"suite": "nope"}, "unknown suite"),
                                   ("key", {"suite": "quick", "limt": 3}, "eval.limt"),
                                   ("none", None, "--delete-models needs an 'eval' section")):
        spec = {"config": config, "grid": {"models.0.parameters.weight": [0.5]}}
        if section is not None:
            spec["eval"] = section
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        assert main(["merge", "sweep", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / f"out-{name}"),
                     "--delete-models"]) == 2
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / f"out-{name}").exists()
