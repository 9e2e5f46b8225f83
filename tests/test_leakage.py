"""No leakage by construction: sources split in data/splits.yaml, training builders draw only from the training
split, and the leakage check (word overlap + MiniLM near-duplicates, threshold chosen on labelled paraphrase pairs)
passes every training set the project builds against every evaluation set. The first run embeds ~3,000 prompts
(cached in VLSAFE_CACHE's embeddings.sqlite afterwards)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlsafe.cli import main
from vlsafe.data import splits
from vlsafe.data.records import Conversation, Prompt, Turn
from vlsafe.errors import VlsafeError
from vlsafe.eval import benchmarks as B
from vlsafe.safety import align, leakage


@pytest.fixture(scope="module")
def evaluation():
    return {name: load() for name, load in leakage.evaluation_sets().items()}


@pytest.fixture(scope="module")
def pools(evaluation):
    """The harmful pool every builder draws from (with what was dropped), and align's benign prompts."""
    return (*align.harmful_pool(evaluation), align.benign_prompts())


def _pairs():
    return [json.loads(line) for line in leakage.PARAPHRASE_PAIRS.read_text().splitlines()]


def test_cosine_threshold_is_chosen_on_the_labelled_pairs_and_catches_what_words_miss():
    from vlsafe.eval.embed import embedder

    pairs = _pairs()
    same = np.array([p["same_request"] for p in pairs])
    assert same.sum() >= 50 and (~same).sum() >= 50
    cosine = (embedder().encode([p["a"] for p in pairs]) * embedder().encode([p["b"] for p in pairs])).sum(1)
    # the rule: the lowest threshold whose precision on the pairs is at least 0.8
    candidates = sorted(set(np.round(cosine, 2)))
    chosen = next(t for t in candidates if (same[cosine >= t]).mean() >= 0.8)
    assert abs(chosen - leakage.SAME_MEANING) <= 0.01
    flagged = cosine >= leakage.SAME_MEANING
    precision, recall = same[flagged].mean(), flagged[same].mean()
    assert precision >= 0.8 and recall >= 0.55, (precision, recall)  # documented: 0.80 / 0.56
    words = np.array([bool(B.find_overlap([Prompt(id="a", text=p["a"])], [Prompt(id="b", text=p["b"])]))
                      for p in pairs])
    assert not words[same].any()  # word overlap finds none of the paraphrases
    assert (flagged & same & ~words).sum() >= 25


def test_word_overlap_finds_every_pair_a_plain_jaccard_finds_in_any_block_size(evaluation, monkeypatch):
    """find_overlap's sparse product against word-set Jaccard computed pair by pair, on AdvBench against
    StrongREJECT and HarmBench (real near-duplicates), at a threshold low enough for thousands of pairs."""
    prompts, others = B.advbench()[:150], evaluation["strongreject"] + evaluation["harmbench"]

    other_words = [(o.id, set(B._normal(o.text).split())) for o in others]
    plain = []
    for p in prompts:
        a = set(B._normal(p.text).split())
        for other_id, b in other_words:
            if a & b and len(a & b) / len(a | b) >= 0.3:
                plain.append((p.id, other_id, round(len(a & b) / len(a | b), 3)))
    assert len(plain) > 100 and any(s >= 0.8 for *_, s in plain)
    assert B.find_overlap(prompts, others, 0.3) == plain  # the same pairs, in the order of prompts, then others
    monkeypatch.setattr(B, "OVERLAP_BLOCK", 7)  # blocks that end mid-list: nothing lost or repeated
    assert B.find_overlap(prompts, others, 0.3) == plain
    assert B.find_overlap([Prompt(id="x", text="?!")], others) == []  # no words: no overlap


def test_check_catches_a_paraphrase_that_word_overlap_misses(tmp_path, capsys):
    from vlsafe.safety import jsonl

    evaluation = {"defs": [Prompt(id="e1", text="What does 'extortion' mean?")]}
    records = [Conversation(id="para", turns=[Turn(role="user", content='What does the word "extortion" mean?'),
                                              Turn(role="assistant", content="It means...")])]
    assert leakage.check(records, evaluation, cosine=None)["leaks"] == 0  # words alone miss it
    with pytest.raises(VlsafeError, match=r"record 'para#0' ~ defs 'e1' \(embedding cosine 0\.9"):
        leakage.check(records, evaluation)
    found = leakage.find(leakage.user_prompts(records), evaluation)
    assert [f["check"] for f in found] == ["embedding"] and found[0]["similarity"] is None
    # through the CLI, against the real evaluation sets: a reworded over-refusal prompt
    reworded = B.overrefusal()[0].text.replace("My laptop fan", "The fan in my laptop")
    path = jsonl.save([Conversation(id="r", turns=[Turn(role="user", content=reworded),
                                                   Turn(role="assistant", content="Sure.")])], tmp_path / "r.jsonl")
    assert main(["safety", "leakage", str(path)]) == 2
    assert "overrefusal" in capsys.readouterr().err


def test_splits_are_declared_once_and_disjoint():
    spec = splits.declared()
    assert not set(spec["training"]) & set(spec["evaluation"])
    assert list(leakage.evaluation_sets()) == splits.evaluation_names()
    for source, load in (("advbench", B.advbench), ("donotanswer", B.do_not_answer)):
        prompts = load()
        train, held = splits.training_part(source, prompts), splits.heldout_part(source, prompts)
        assert not {p.id for p in train} & {p.id for p in held} and len(train) + len(held) == len(prompts)
        assert 0.15 < len(held) / len(prompts) < 0.25
        # the split is a property of the id, not of the order
        assert {p.id for p in splits.heldout_part(source, prompts[::-1])} == {p.id for p in held}
    assert {p.id for p in B.get("advbench_heldout").load()} == {p.id for p in splits.heldout_part("advbench",
                                                                                                   B.advbench())}
    with pytest.raises(VlsafeError, match="'harmbench' is not a training source"):
        splits.training_part("harmbench", [])


def test_every_training_set_the_project_builds_passes_every_evaluation_set(evaluation, pools):
    pool, dropped, benign = pools
    assert len(pool) >= 400 and dropped  # AdvBench repeats itself: near-copies of held-out items are dropped
    assert not any(splits.is_heldout("advbench" if p.source == "advbench" else "donotanswer", p.id) for p in pool)
    # align (harmful + benign prompts), the VLGuard-like set (harmful pool prompts) and the DPO pairs (harmful
    # pool + benign prompts) all draw their user prompts from these two pools
    assert leakage.find(pool + benign, evaluation) == []


def test_packaged_suites_never_evaluate_training_prompts(pools):
    from vlsafe.eval.run import SUITE_DIR, load_suite

    training_ids = {p.id for p in pools[0] + pools[2]}
    for path in SUITE_DIR.glob("*.yaml"):
        _, spec = load_suite(str(path))
        for entry in spec.entries:
            assert entry.benchmark not in splits.declared()["training"], (path.name, entry.benchmark)
            bench = B.get(entry.benchmark) if entry.benchmark != "heldout" else None
            if bench is not None and not bench.needs_data:
                assert not {p.id for p in bench.load()} & training_ids, (path.name, entry.benchmark)
