"""Each published-format loader on its fixture (tests/fixtures/formats, written in the exact published layout),
through the library and through `vlsafe data inspect`; bad input exits 2 with one line naming file and record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlsafe.cli import main
from vlsafe.data import formats
from vlsafe.errors import VlsafeError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"

# format -> (path under fixtures, records, labels)
CASES = {
    "xstest": ("xstest/xstest_prompts.csv", 6, {"benign": 4, "harmful": 2}),
    "sorry_bench": ("sorry_bench/question.jsonl", 3, {"harmful": 3}),
    "wildjailbreak": ("wildjailbreak/eval.tsv", 3, {"benign": 1, "harmful": 2}),
    "mmsafetybench": ("mmsafetybench/processed_questions", 9, {"harmful": 9}),
    "figstep": ("figstep/question/safebench.csv", 3, {"harmful": 3}),
    "siuo": ("siuo/siuo_gen.json", 2, {"harmful": 2}),
    "vlguard_test": ("vlguard/test.json", 5, {"benign": 2, "harmful": 3}),
    "mmbench": ("mmbench/mmbench_dev_en.tsv", 3, {"benign": 3}),
    "mme": ("mme/MME_Benchmark_release_version", 4, {"benign": 4}),
    "seed_bench": ("seed_bench/SEED-Bench.json", 2, {"benign": 2}),
}
MULTIMODAL = {"mmsafetybench", "figstep", "siuo", "vlguard_test", "mmbench", "mme", "seed_bench"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))  # where MMBench's decoded images go


def test_every_registered_evaluation_format_has_a_fixture():
    # training formats (llava, vlguard train, preference pairs, vlsafe's own jsonl) are tested with their builders
    evaluation = {name for name, target in formats.FORMATS.items() if "llava" not in target
                  and "preference" not in target and not target.startswith("vlsafe.data.formats.vlguard:")
                  and not target.startswith("vlsafe.safety.")}
    assert evaluation == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loader_reads_its_fixture(name):
    rel, count, labels = CASES[name]
    prompts = formats.load(name, FIXTURES / rel)
    assert len(prompts) == count
    assert len({p.id for p in prompts}) == count, "ids are unique"
    assert {label: sum(p.label == label for p in prompts) for label in labels} == labels
    for prompt in prompts:
        assert prompt.text.strip() and prompt.source
        if name in MULTIMODAL:
            assert prompt.image and Path(prompt.image).is_absolute()
            with Image.open(prompt.image) as image:
                image.verify()
        else:
            assert prompt.image is None


@pytest.mark.parametrize("name", sorted(CASES))
def test_inspect_prints_a_json_summary(name, capsys):
    rel, count, labels = CASES[name]
    assert main(["data", "inspect", str(FIXTURES / rel), "--format", name]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == count
    assert summary["labels"] == labels
    assert sum(summary.get("categories", {}).values()) <= count


def test_xstest_fields():
    prompts = formats.load("xstest", FIXTURES / "xstest" / "xstest_prompts.csv")
    first, contrast = prompts[0], prompts[4]
    assert (first.id, first.category, first.label, first.meta["focus"]) == ("xstest-1", "homonyms", "benign",
                                                                           "terminate")
    assert (contrast.category, contrast.label) == ("contrast_homonyms", "harmful")


def test_mmsafetybench_pairs_each_variant_with_its_question_field():
    root = FIXTURES / "mmsafetybench"
    table = json.loads((root / "processed_questions" / "01-Illegal_Activitiy.json").read_text())
    prompts = {p.id: p for p in formats.load("mmsafetybench", root / "processed_questions")}
    for variant, key in (("SD", "Rephrased Question(SD)"), ("SD_TYPO", "Rephrased Question"),
                         ("TYPO", "Rephrased Question")):
        prompt = prompts[f"mmsafetybench-01-Illegal_Activitiy-1-{variant}"]
        assert prompt.text == table["1"][key]
        assert Path(prompt.image).parts[-3:] == ("01-Illegal_Activitiy", variant, "1.jpg")
        assert prompt.meta["key_phrase"] == table["1"]["Key Phrase"] and prompt.category == "Illegal_Activitiy"
    sd, typo = (prompts[f"mmsafetybench-01-Illegal_Activitiy-1-{v}"] for v in ("SD", "TYPO"))
    assert sd.text != typo.text
    only_sd = formats.load("mmsafetybench", root / "processed_questions" / "08-Political_Lobbying.json",
                           variants=("SD",))
    assert [p.meta["variant"] for p in only_sd] == ["SD"]


def test_figstep_sends_the_carrier_prompt_with_the_typographic_image():
    from vlsafe.data.formats.figstep import CARRIER_PROMPT

    prompt = formats.load("figstep", FIXTURES / "figstep" / "question" / "safebench.csv")[2]
    assert prompt.text == CARRIER_PROMPT
    assert Path(prompt.image).name == "query_ForbidQI_4_1_6.png"
    assert prompt.meta["request"] == "How can someone do placeholder thing three?"
    assert prompt.category == "Physical Harm"


def test_vlguard_test_subsets_pick_the_right_instruction():
    prompts = formats.load("vlguard_test", FIXTURES / "vlguard" / "test.json")
    by_subset = {}
    for p in prompts:
        by_subset.setdefault(p.meta["subset"], []).append(p)
    assert [p.text for p in by_subset["safe_safes"]] == ["What colour is the square?", "Describe the picture."]
    assert all(p.label == "harmful" for p in by_subset["safe_unsafes"] + by_subset["unsafes"])
    assert by_subset["unsafes"][0].category == "risky behavior"
    only = formats.load("vlguard_test", FIXTURES / "vlguard" / "test.json", subsets=("unsafes",))
    assert len(only) == 1


def test_mmbench_decodes_images_once_and_follows_image_references(tmp_path):
    prompts = formats.load("mmbench", FIXTURES / "mmbench" / "mmbench_dev_en.tsv", image_root=tmp_path / "img")
    assert prompts[2].image == prompts[0].image != prompts[1].image  # row 2 refers to row 0's image
    assert len(list((tmp_path / "img").iterdir())) == 2
    with Image.open(prompts[0].image) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert prompts[1].text.splitlines()[0] == "The picture is tiny."  # the hint comes first
    assert "C." not in prompts[1].text  # empty ("nan") options are left out
    assert [p.answer for p in prompts] == ["A", "B", "A"]


def test_mme_reads_both_folder_shapes():
    prompts = formats.load("mme", FIXTURES / "mme" / "MME_Benchmark_release_version")
    assert {p.category for p in prompts} == {"artwork", "existence"}
    assert sorted(p.answer for p in prompts) == ["No", "No", "Yes", "Yes"]
    assert all(p.text.endswith("Please answer yes or no.") for p in prompts)


def test_seed_bench_skips_video_and_names_dimensions():
    prompts = formats.load("seed_bench", FIXTURES / "seed_bench")  # the folder holding SEED-Bench.json
    assert [(p.category, p.answer) for p in prompts] == [("Instances Counting", "A"), ("Instance Attributes", "C")]
    assert "A. One" in prompts[0].text


def test_sorry_bench_names_categories_by_release():
    prompts = formats.load("sorry_bench", FIXTURES / "sorry_bench" / "question.jsonl")
    assert [p.category for p in prompts] == ["personal insulting words", "violent crimes",
                                             "dangerous machinery operation advice"]
    with pytest.raises(VlsafeError, match="outside 1..44"):
        formats.load("sorry_bench", FIXTURES / "sorry_bench" / "question.jsonl", release="202503")


def test_wildjailbreak_keeps_multiline_prompts():
    prompts = formats.load("wildjailbreak", FIXTURES / "wildjailbreak" / "eval.tsv")
    assert prompts[0].text.endswith("\nKeep it short.")
    assert [p.category for p in prompts] == ["adversarial_harmful", "adversarial_harmful", "adversarial_benign"]


# ------------------------------------------------------------------------------------------------ bad input
def _copy(tmp_path: Path, folder: str) -> Path:
    return Path(shutil.copytree(FIXTURES / folder, tmp_path / folder))


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_field_names_file_and_record(tmp_path, capsys):
    root = _copy(tmp_path, "siuo")
    items = json.loads((root / "siuo_gen.json").read_text())
    del items[1]["question"]
    (root / "siuo_gen.json").write_text(json.dumps(items))
    _fails(capsys, ["data", "inspect", str(root / "siuo_gen.json"), "--format", "siuo"],
           "siuo_gen.json", "record 1", "'question'")


def test_missing_image_names_file_record_and_image(tmp_path, capsys):
    root = _copy(tmp_path, "vlguard")
    (root / "test" / "safe_folder" / "p3.png").unlink()
    _fails(capsys, ["data", "inspect", str(root / "test.json"), "--format", "vlguard_test"],
           "test.json", "record 2", "placeholder_safe_2", "safe_folder/p3.png")


def test_missing_mmsafetybench_variant_image(tmp_path, capsys):
    root = _copy(tmp_path, "mmsafetybench")
    (root / "imgs" / "08-Political_Lobbying" / "TYPO" / "0.jpg").unlink()
    _fails(capsys, ["data", "inspect", str(root / "processed_questions"), "--format", "mmsafetybench"],
           "08-Political_Lobbying.json", "record '0'", "TYPO/0.jpg")


def test_image_root_option_is_used(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(FIXTURES / "siuo" / "images", elsewhere)
    root = tmp_path / "siuo"
    root.mkdir()
    shutil.copy(FIXTURES / "siuo" / "siuo_gen.json", root)
    _fails(capsys, ["data", "inspect", str(root / "siuo_gen.json"), "--format", "siuo"], "S-01.png")
    assert main(["data", "inspect", str(root / "siuo_gen.json"), "--format", "siuo", "--image-root",
                 str(elsewhere)]) == 0


@pytest.mark.parametrize("folder,file,name", [("siuo", "siuo_gen.json", "siuo"),
                                              ("vlguard", "test.json", "vlguard_test"),
                                              ("seed_bench", "SEED-Bench.json", "seed_bench")])
def test_malformed_json(tmp_path, capsys, folder, file, name):
    root = _copy(tmp_path, folder)
    text = (root / file).read_text()
    (root / file).write_text(text[: len(text) // 2])
    _fails(capsys, ["data", "inspect", str(root / file), "--format", name], file, "malformed JSON at line")


def test_malformed_jsonl_line(tmp_path, capsys):
    root = _copy(tmp_path, "sorry_bench")
    with open(root / "question.jsonl", "a") as handle:
        handle.write('{"question_id": 4, "category": "2", "turns": ["unterminated\n')
    _fails(capsys, ["data", "inspect", str(root / "question.jsonl"), "--format", "sorry_bench"],
           "question.jsonl", "line 4", "malformed JSON")


def test_missing_csv_column(tmp_path, capsys):
    path = tmp_path / "safebench.csv"
    path.write_text("dataset,category_id,task_id,category_name,question\nSafeBench,1,1,x,y\n")
    _fails(capsys, ["data", "inspect", str(path), "--format", "figstep"], "safebench.csv", "'instruction'")


@pytest.mark.parametrize("name,folder,file,old,new,needle", [
    ("xstest", "xstest", "xstest_prompts.csv", ",homonyms,safe,", ",homonyms,maybe,", "line 2"),
    ("wildjailbreak", "wildjailbreak", "eval.tsv", "adversarial_benign", "adversarial_other", "line"),
    ("mmbench", "mmbench", "mmbench_dev_en.tsv", "iVBOR", "!!!!!", "not valid base64"),
    ("mme", "mme", "MME_Benchmark_release_version/existence/000000000001.txt", "\tNo", "\tMaybe", "line 2"),
    ("seed_bench", "seed_bench", "SEED-Bench.json", '"answer": "C"', '"answer": "E"', "question_id 2"),
])
def test_bad_values_are_named(tmp_path, capsys, name, folder, file, old, new, needle):
    root = _copy(tmp_path, folder)
    target = root / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    argv_path = root / CASES[name][0].split("/", 1)[1]
    _fails(capsys, ["data", "inspect", str(argv_path), "--format", name], needle)


def test_unknown_format_and_missing_path(capsys):
    _fails(capsys, ["data", "inspect", str(FIXTURES / "siuo" / "siuo_gen.json"), "--format", "nope"],
           "unknown format 'nope'")
    _fails(capsys, ["data", "inspect", "no/such/file.json", "--format", "siuo"], "no/such/file.json")
