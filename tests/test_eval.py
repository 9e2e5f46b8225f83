"""Evaluation end to end on pico models: the generation cache, results.json, conditions, bad input."""

from __future__ import annotations

import json

import pytest

from vlsafe.cli import main
from vlsafe.data.records import Prompt
from vlsafe.eval import generate as generation
from vlsafe.eval.cache import Cache


@pytest.fixture(scope="module")
def pico_vlm(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "vlm"
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def tiny_suite(tmp_path):
    """The quick suite's shape with 4 new tokens: pico models write noise, and the tests check the plumbing."""
    path = tmp_path / "tiny.yaml"
    path.write_text("description: test\nseed: 0\nmax_new_tokens: 4\nentries:\n"
                    "  - {benchmark: harmbench, sample: 20, conditions: [text, blank, typo]}\n"
                    "  - {benchmark: overrefusal, sample: 30, conditions: [text, blank]}\n"
                    "  - {benchmark: text_helpfulness, sample: 20, conditions: [text]}\n"
                    "  - {benchmark: heldout, sample: 30, conditions: [native]}\n")
    return str(path)


def _counting(monkeypatch) -> list[int]:
    calls = []
    real = generation._generate_hf

    def counted(bundle, prompts, *args):
        calls.append(len(prompts))
        return real(bundle, prompts, *args)

    monkeypatch.setattr(generation, "_generate_hf", counted)
    return calls


def test_second_generation_hits_the_cache_and_runs_the_model_zero_times(tmp_path, monkeypatch):
    from vlsafe.model import checkpoint

    calls = _counting(monkeypatch)
    bundle = checkpoint.load("pico")
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(["What is 2+2?", "Name a colour.", "What is 2+2?"])]
    decoding = generation.Decoding(max_new_tokens=4)
    cache = Cache(tmp_path / "eval.sqlite")
    first = generation.generate(bundle, prompts, decoding, cache=cache)
    assert calls == [2]  # the repeated prompt is generated once
    again = generation.generate(bundle, prompts, generation.Decoding(max_new_tokens=4, seed=7), cache=cache)
    assert calls == [2] and again == first  # greedy ignores the seed, so a new seed is still a hit
    assert cache.counts()["generations"] == 2
    generation.generate(bundle, prompts[:1], generation.Decoding(max_new_tokens=5), cache=cache)
    assert calls == [2, 1]  # other decoding settings are another key
    # a second process (another Cache on the same file) sees the rows
    keys = generation.generation_keys(bundle, prompts, decoding)
    assert keys[0] == keys[2] and set(Cache(tmp_path / "eval.sqlite").get_many(keys)) == set(keys)


def test_eval_of_a_vlm_writes_results_with_cis_and_a_rerun_generates_nothing(pico_vlm, tmp_path, monkeypatch,
                                                                            tiny_suite):
    cache = str(tmp_path / "eval.sqlite")
    args = ["eval", "--model", str(pico_vlm), "--suite", tiny_suite, "--limit", "3", "--conditions", "text,typo",
            "--cache", cache, "--judge", "refusal-patterns"]
    assert main([*args, "--out", str(tmp_path / "run1")]) == 0
    report = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert report["schema"] == "vlsafe.eval/1" and report["model"]["is_vlm"]
    cell = report["results"]["harmbench"]["typo"]["attack_success_rate"]
    assert cell["n"] == 3 and cell["higher_is_better"] is False
    assert 0 <= cell["ci95"][0] <= cell["rate"] <= cell["ci95"][1] <= 1
    assert report["results"]["text_helpfulness"]["text"]["accuracy"]["judge"] == "answer-match"
    assert set(report["results"]["overrefusal"]) == {"text"}  # the suite runs overrefusal under text and blank
    assert {"benchmark": "heldout", "condition": "*", "reason": "needs --corpus"} in report["skipped"]
    samples = [json.loads(line) for line in (tmp_path / "run1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == sum(m["n"] for c in report["results"].values() for ms in c.values() for m in ms.values())
    typo = [s for s in samples if s["condition"] == "typo"]
    assert typo and all(s["image"] and s["request"] != s["prompt"] for s in typo)
    assert {"response", "refused", "score", "flag"} <= set(samples[0])

    calls = _counting(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0
    assert calls == []
    rerun = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert rerun["results"] == report["results"] and rerun["cache"]["generation_misses"] == 0
    assert rerun["items_sha256"] == report["items_sha256"]


def test_a_text_only_llm_gets_only_the_text_condition(tmp_path, tiny_suite):
    out = tmp_path / "llm"
    assert main(["eval", "--model", "pico", "--suite", tiny_suite, "--limit", "2", "--out", str(out),
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["is_vlm"] is False
    assert {c for cells in report["results"].values() for c in cells} == {"text"}
    assert any(s["condition"] == "typo" and "text-only" in s["reason"] for s in report["skipped"])


def test_image_questions_are_scored_against_answer_and_aliases(pico_vlm, tmp_path, tiny_suite):
    from vlsafe.data.synthetic import write_corpus

    write_corpus(tmp_path / "corpus", n=4, seed=0, n_eval=6)
    out = tmp_path / "help"
    assert main(["eval", "--model", str(pico_vlm), "--suite", tiny_suite, "--limit", "4", "--out", str(out),
                 "--corpus", str(tmp_path / "corpus"), "--conditions", "native",
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["results"]["heldout"]["native"]["accuracy"]["n"] == 4


def test_bad_eval_input_exits_2_and_leaves_nothing(tmp_path, capsys):
    base = ["eval", "--model", "pico", "--cache", str(tmp_path / "c.sqlite")]
    assert main([*base, "--suite", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main([*base, "--suite", "quick", "--conditions", "sideways", "--out", str(tmp_path / "b")]) == 2
    assert main([*base, "--suite", "quick", "--judge", "nope", "--out", str(tmp_path / "c")]) == 2
    assert main([*base, "--suite", "quick", "--limit", "0", "--out", str(tmp_path / "d")]) == 2
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("entries: [{benchmark: harmbench, sampel: 3}]\n")
    assert main([*base, "--suite", str(bad_suite), "--out", str(tmp_path / "e")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcde")
    not_a_cache = tmp_path / "x.sqlite"
    not_a_cache.write_text("not sqlite at all " * 100)
    with pytest.raises(Exception, match="not a usable evaluation cache"):
        Cache(not_a_cache)


def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path, capsys):
    from vlsafe.model import checkpoint

    bundle = checkpoint.load("pico")
    with pytest.raises(Exception, match="vllm|HF directory"):
        generation.generate(bundle, [Prompt(id="1", text="hi")], backend="vllm")
    with pytest.raises(Exception, match="unknown generation backend"):
        generation.generate(bundle, [Prompt(id="1", text="hi")], backend="tgi")


def test_bench_eval_reports_naive_batched_and_cached_side_by_side(capsys):
    assert main(["bench", "eval", "--model", "pico", "--n", "4", "--max-new-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["modes"]) == {"naive", "batched", "cached"} and report["n"] == 4
    assert report["modes"]["naive"]["seconds"] > 0 and report["modes"]["batched"]["seconds"] > 0
    assert report["modes"]["cached"]["seconds"] < report["modes"]["batched"]["seconds"]
