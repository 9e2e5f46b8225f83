"""The study job end to end on pico models: two `vlsafe eval` runs (LLM, VLM@0) and the summary over them."""

from __future__ import annotations

import json

import pytest

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError
from vlsafe.eval.metrics import answer_correct
from vlsafe.study.baseline import BaselineConfig, run_baseline


def _samples(run) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_study_evaluates_llm_and_vlm0_through_eval_and_the_vlm_reads_text_like_its_llm(tmp_path):
    out = tmp_path / "study"
    config = BaselineConfig(llm="pico", tower="pico", n_harmful=3, n_benign=3, max_new_tokens=4, batch_size=8,
                            cache=str(tmp_path / "eval.sqlite"))
    printed = []
    summary = run_baseline(out, config, log=printed.append)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    runs = {key: json.loads((out / key / "results.json").read_text()) for key in ("llm", "vlm0")}
    assert all((r["schema"], r["schema_version"]) == ("vlsafe.eval", 3) for r in runs.values())
    # the study's options are the suite each run records; the summary's rows are the runs' own headline rows
    entries = {e["benchmark"]: e["sample"] for e in runs["llm"]["suite"]["entries"]}
    assert entries["harmbench"] == entries["strongreject"] == entries["overrefusal"] == 3
    assert runs["vlm0"]["suite"] == runs["llm"]["suite"] and runs["llm"]["decoding"]["max_new_tokens"] == 4
    assert summary["results"] == [{"model": k, **r} for k in runs for r in runs[k]["results"] if r["category"] == "*"]
    rows = {(r["model"], r["benchmark"], r["condition"], r["metric"], r["judge"]): r for r in summary["results"]}
    asr = rows["vlm0", "harmbench", "typo", "attack_success_rate", "default"]
    assert asr["n"] == 3 and 0 <= asr["ci"][0] <= asr["value"] <= asr["ci"][1] <= 1
    assert {c for m, _, c, _, _ in rows if m == "llm"} == {"text"}  # a text LLM: text condition only
    # provenance: both models hashed, the VLM@0 checkpoint kept and traced to its LLM and tower
    vlm0 = summary["models"]["vlm0"]
    assert vlm0["fingerprint"] != summary["models"]["llm"]["fingerprint"] and vlm0["content_sha256"]
    assert vlm0["built_from"]["llm"] == "pico" and (out / vlm0["path"] / "vlsafe.json").is_file()
    assert runs["vlm0"]["model"]["spec"] == str(out / "models" / "vlm0")  # the final path, loadable later
    # VLM@0 without an image is its LLM (the added image-token row is never read): same words, item by item
    text = {key: {(s["benchmark"], s["id"]): s["response"] for s in _samples(out / key) if s["condition"] == "text"}
            for key in runs}
    assert text["llm"] and text["llm"] == text["vlm0"]
    assert all(s["image"] for s in _samples(out / "vlm0") if s["condition"] in ("blank", "typo"))
    # the table: a line per benchmark and metric, a column per model and condition, n and CI in every cell
    table = printed[-1].splitlines()
    assert table[0].split() == ["llm/text", "vlm0/text", "vlm0/blank", "vlm0/typo"]
    harmbench = next(line for line in table if line.startswith("harmbench ASR"))
    assert harmbench.count("n=3") == 4 and "[" in harmbench


def test_study_rejects_bad_options_and_leaves_nothing(tmp_path):
    with pytest.raises(VlsafeError, match="--n-harmful"):
        run_baseline(tmp_path / "study", BaselineConfig(llm="pico", tower="pico", n_harmful=0))
    assert not (tmp_path / "study").exists()


def test_answer_matching_is_whole_word():
    prompt = Prompt(id="q", text="What is 6 x 7?", answer="42", meta={"aliases": ["forty-two"]})
    assert answer_correct("The answer is 42.", prompt.answer, prompt.meta["aliases"])
    assert answer_correct("Forty-two!", prompt.answer, prompt.meta["aliases"])
    assert not answer_correct("It is 142.", prompt.answer, prompt.meta["aliases"])
