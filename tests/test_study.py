"""The baseline study job end to end on pico models."""

from __future__ import annotations

import json

from vlsafe.study.baseline import BaselineConfig, answer_correct, run_baseline
from vlsafe.data.records import Prompt


def test_baseline_writes_results_with_cis_and_the_vlm_reads_text_like_its_llm(tmp_path):
    out = tmp_path / "study"
    config = BaselineConfig(llm="pico", tower="pico", n_harmful=3, n_benign=3, max_new_tokens=4, batch_size=8)
    report = run_baseline(out, config, log=lambda _: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    asr = saved["results"]["vlm0/typo"]["attack_success_rate"]
    assert asr["n"] == 6 and 0 <= asr["ci95"][0] <= asr["rate"] <= asr["ci95"][1] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by_key = {(s["model"], s["condition"], s["id"]): s["response"] for s in samples}
    # VLM@0 without an image is its LLM (the added image-token row is never read): same words, item by item
    text_ids = [s["id"] for s in samples if s["model"] == "llm"]
    assert text_ids and all(by_key[("llm", "text", i)] == by_key[("vlm0", "text", i)] for i in text_ids)
    assert all(s["image"] for s in samples if s["condition"] in ("blank", "typo"))
    assert saved["models"]["vlm0"]["content_sha256"] and saved["items"]["harmful"]


def test_answer_matching_is_whole_word():
    prompt = Prompt(id="q", text="What is 6 x 7?", answer="42", meta={"aliases": ["forty-two"]})
    assert answer_correct("The answer is 42.", prompt)
    assert answer_correct("Forty-two!", prompt)
    assert not answer_correct("It is 142.", prompt)
