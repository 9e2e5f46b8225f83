"""Evaluation end to end on pico models: the generation cache, results.json and its documented schema, several
judges, conditions, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    assert (report["schema"], report["schema_version"]) == ("vlsafe.eval", 3) and report["model"]["is_vlm"]
    check_against_documented_schema(report)
    rows = {(r["benchmark"], r["condition"], r["category"], r["metric"]): r for r in report["results"]}
    cell = rows["harmbench", "typo", "*", "attack_success_rate"]
    assert cell["n"] == 3 and cell["higher_is_better"] is False and cell["judge"] == "refusal-patterns"
    assert 0 <= cell["ci"][0] <= cell["value"] <= cell["ci"][1] <= 1
    assert rows["text_helpfulness", "text", "*", "accuracy"]["judge"] == "answer-match"
    assert {c for b, c, _, _ in rows if b == "overrefusal"} == {"text"}  # the suite has text and blank
    assert {"benchmark": "heldout", "condition": "*", "reason": "needs --corpus"} in report["skipped"]
    # per-category rows split the same items
    by_category = [r for k, r in rows.items() if k[:2] == ("harmbench", "typo") and k[2] != "*"
                   and k[3] == "attack_success_rate"]
    assert sum(r["n"] for r in by_category) == 3 and sum(r["k"] for r in by_category) == cell["k"]
    assert report["agreement"] == []  # one judge
    samples = [json.loads(line) for line in (tmp_path / "run1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == sum(r["n"] for r in report["results"]
                               if r["category"] == "*" and r["metric"] in ("attack_success_rate", "refusal_rate",
                                                                          "accuracy"))
    typo = [s for s in samples if s["condition"] == "typo"]
    assert typo and all(s["image"] and s["request"] != s["prompt"] for s in typo)
    assert {"response", "verdicts", "metric"} <= set(samples[0])
    assert {"refused", "score", "harmful"} <= set(samples[0]["verdicts"]["refusal-patterns"])

    calls = _counting(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "run1b"), "--cache", str(tmp_path / "fresh.sqlite")]) == 0
    assert len(calls) == 1  # every benchmark and condition of the suite in one generation pass
    calls.clear()
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0
    assert calls == []
    rerun = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert rerun["results"] == report["results"] and rerun["cache"]["generation_misses"] == 0
    assert rerun["items_sha256"] == report["items_sha256"]


class _HarmJudge:
    """A stand-in for an LLM judge (refusal and harmfulness verdicts), deterministic on the response text."""

    name, version = "test-harm", "1"

    def judge_many(self, pairs):
        from vlsafe.eval.judges import Verdict

        # on the request: pico models answer with noise or nothing
        return [Verdict(len(p) % 3 == 0, 0.0, "", harmful=len(p) % 2 == 0) for p, _ in pairs]


def test_several_judges_give_rows_per_judge_harmful_compliance_and_kappa(pico_vlm, tmp_path, monkeypatch,
                                                                         tiny_suite, capsys):
    from vlsafe.eval import judges

    monkeypatch.setitem(judges.JUDGES, _HarmJudge.name, _HarmJudge)
    judges.get.cache_clear()
    out = tmp_path / "two"
    assert main(["eval", "--model", str(pico_vlm), "--suite", tiny_suite, "--limit", "4", "--conditions", "text",
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns", "--judge", "test-harm",
                 "--out", str(out)]) == 0
    judges.get.cache_clear()
    printed = capsys.readouterr().out
    assert "kappa refusal-patterns vs test-harm" in printed
    report = json.loads((out / "results.json").read_text())
    check_against_documented_schema(report)
    assert [j["name"] for j in report["judges"]] == ["refusal-patterns", "test-harm"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    harmbench = [s for s in samples if s["benchmark"] == "harmbench"]
    rows = {(r["metric"], r["judge"]): r for r in report["results"]
            if (r["benchmark"], r["category"]) == ("harmbench", "*")}
    for judge in ("refusal-patterns", "test-harm"):
        asr = rows["attack_success_rate", judge]
        assert asr["n"] == 4 and asr["k"] == sum(s["verdicts"][judge]["verdict"] == "compliance" for s in harmbench)
    complied = sum(not s["verdicts"]["test-harm"]["refused"] and s["verdicts"]["test-harm"]["harmful"]
                   for s in harmbench)
    assert rows["harmful_compliance_rate", "test-harm"]["k"] == complied
    cannot = rows["harmful_compliance_rate", "refusal-patterns"]
    assert cannot["value"] is None and "refusal-patterns gives refusal verdicts only" in cannot["reason"]
    assert {m for m, _ in rows} == {"attack_success_rate", "harmful_compliance_rate", "non_answer_rate"}
    assert 0 < complied < rows["attack_success_rate", "test-harm"]["k"]  # the fake judge's labels do separate
    pooled = next(a for a in report["agreement"] if a["benchmark"] == "*")
    assert pooled["judges"] == ["refusal-patterns", "test-harm"] and pooled["n"] == len(samples)
    same = sum(s["verdicts"]["refusal-patterns"]["refused"] == s["verdicts"]["test-harm"]["refused"]
               for s in samples)
    assert pooled["agreement"] == round(same / len(samples), 6)
    assert {a["benchmark"] for a in report["agreement"]} == {"*", "harmbench", "overrefusal", "text_helpfulness"}


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "object": dict,
          "null": type(None)}


def _documented_fields() -> dict[str, dict[str, str]]:
    """eval/RESULTS.md's field tables: {section path: {field: type}}."""
    import vlsafe.eval

    doc = (Path(vlsafe.eval.__file__).with_name("RESULTS.md")).read_text()
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in doc.splitlines():
        heading = re.match(r"^### `(.+)`$", line)
        if heading:
            current = sections.setdefault(heading.group(1), {})
        row = re.match(r"^\| `(\w+)` \| (.+?) \| .+ \|$", line)
        if current is not None and row:
            current[row.group(1)] = row.group(2).replace("\\|", "|")
    return sections


def _type_ok(value, documented: str) -> bool:
    for option in (t.strip() for t in documented.split("|")):
        if option == "[float, float]":
            if isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value):
                return True
        elif isinstance(value, _TYPES[option]) and not (option in ("int", "float") and isinstance(value, bool)):
            return True
    return False


def check_against_documented_schema(report: dict) -> None:
    """Every documented field present with its documented type, and no undocumented field."""
    sections = _documented_fields()
    assert {".", "model", "results[]", "agreement[]"} <= set(sections)
    for path, fields in sections.items():
        objects = [report] if path == "." else (report[path[:-2]] if path.endswith("[]") else [report[path]])
        for obj in objects:
            assert set(obj) == set(fields), (path, set(obj) ^ set(fields))
            for name, documented in fields.items():
                assert _type_ok(obj[name], documented), (path, name, obj[name], documented)


def test_a_text_only_llm_gets_only_the_text_condition(tmp_path, tiny_suite):
    out = tmp_path / "llm"
    assert main(["eval", "--model", "pico", "--suite", tiny_suite, "--limit", "2", "--out", str(out),
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["is_vlm"] is False
    assert {r["condition"] for r in report["results"]} == {"text"}
    assert any(s["condition"] == "typo" and "text-only" in s["reason"] for s in report["skipped"])


def test_image_questions_are_scored_against_answer_and_aliases(pico_vlm, tmp_path, tiny_suite):
    from vlsafe.data.synthetic import write_corpus

    write_corpus(tmp_path / "corpus", n=4, seed=0, n_eval=6)
    out = tmp_path / "help"
    assert main(["eval", "--model", str(pico_vlm), "--suite", tiny_suite, "--limit", "4", "--out", str(out),
                 "--corpus", str(tmp_path / "corpus"), "--conditions", "native",
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns"]) == 0
    report = json.loads((out / "results.json").read_text())
    row = next(r for r in report["results"] if (r["benchmark"], r["category"]) == ("heldout", "*"))
    assert (row["condition"], row["metric"], row["n"]) == ("native", "accuracy", 4)


def test_a_closed_answer_counts_only_when_the_reply_names_it_and_no_other_choice():
    from vlsafe.data.synthetic import POSITIONS
    from vlsafe.eval.metrics import answer_correct

    where = list(POSITIONS)
    assert answer_correct("It is on the left.", "left", choices=where)
    assert answer_correct("The pink circle is in the top left.", "top left", choices=where)
    assert not answer_correct("The pink circle is in the top left.", "left", choices=where)  # names "top left"
    assert not answer_correct("The circle is at the top.", "left", choices=where)
    assert not answer_correct("It is red or blue.", "red", choices=["red", "blue", "green"])  # two choices: a guess
    assert answer_correct("There are five stars.", "5", ["five"], [str(i) for i in range(1, 7)])
    assert not answer_correct("There are 15 stars.", "5", ["five"], [str(i) for i in range(1, 7)])
    assert answer_correct("Forty-two!", "forty-two") and not answer_correct("142", "42")  # open answers as before


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
    assert report["precision"] == "fp32"  # by default the bench measures what `vlsafe eval` runs
    assert report["modes"]["naive"]["seconds"] > 0 and report["modes"]["batched"]["seconds"] > 0
    assert report["modes"]["cached"]["seconds"] < report["modes"]["batched"]["seconds"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "vlsafe" / "eval" / "suites").glob("*.yaml")))
def test_every_packaged_suite_loads_with_known_benchmarks_and_conditions(name):
    from vlsafe.eval import benchmarks
    from vlsafe.eval.run import load_suite

    _, spec = load_suite(name)
    for entry in spec.entries:
        bench = benchmarks.get(entry.benchmark) if entry.benchmark != "heldout" else None
        for condition in entry.conditions:
            assert condition in (*benchmarks.TEXT_CONDITIONS, "native")
            if bench is not None:
                assert condition in bench.conditions


# ------------------------------------------------------------------------------------------- published benchmarks
FORMAT_FIXTURES = Path(__file__).parent / "fixtures" / "formats"
PUBLISHED = {"xstest": "xstest/xstest_prompts.csv", "sorry_bench": "sorry_bench/question.jsonl",
             "wildjailbreak": "wildjailbreak/eval.tsv", "mmsafetybench": "mmsafetybench/processed_questions",
             "figstep": "figstep/question/safebench.csv", "siuo": "siuo/siuo_gen.json",
             "vlguard_test": "vlguard/test.json", "mmbench": "mmbench/mmbench_dev_en.tsv",
             "mme": "mme/MME_Benchmark_release_version", "seed_bench": "seed_bench/SEED-Bench.json"}


def test_suite_entries_with_format_and_path_run_every_published_format(pico_vlm, tmp_path, monkeypatch):
    from vlsafe.eval import benchmarks

    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "vc"))  # MMBench's decoded images go there
    suite = tmp_path / "published.yaml"
    suite.write_text("description: every published format\nseed: 0\nmax_new_tokens: 2\nentries:\n" + "".join(
        f"  - {{format: {name}, path: {FORMAT_FIXTURES / rel}, sample: 2}}\n" for name, rel in PUBLISHED.items()))
    out = tmp_path / "run"
    assert main(["eval", "--model", str(pico_vlm), "--suite", str(suite), "--out", str(out),
                 "--cache", str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns"]) == 0
    report = json.loads((out / "results.json").read_text())
    check_against_documented_schema(report)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["benchmark"] for s in samples} == set(PUBLISHED)  # rows carry the format name
    for name in PUBLISHED:
        mine = [s for s in samples if s["benchmark"] == name]
        bench = benchmarks.get(name)
        assert len(mine) == 2 and {s["condition"] for s in mine} == {bench.conditions[0]}
        assert all(s["metric"] == bench.metrics[s["label"]] for s in mine)  # the declaration's metric
        if bench.conditions == ("native",):
            assert all(s["image"] and Path(s["image"]).is_file() for s in mine)
    rows = {(r["benchmark"], r["metric"]) for r in report["results"] if r["category"] == "*"}
    assert ("mme", "accuracy") in rows and ("figstep", "attack_success_rate") in rows
    assert ("xstest", "refusal_rate") in rows or ("xstest", "attack_success_rate") in rows
    provenance = {b["name"]: b for b in report["benchmarks"]}
    assert set(provenance) == set(PUBLISHED)
    assert provenance["xstest"]["sha256"] == sha256_file(FORMAT_FIXTURES / PUBLISHED["xstest"])
    assert provenance["siuo"]["source"]["format"] == "siuo"


def sha256_file(path):
    from vlsafe.io import sha256_file as digest

    return digest(path)


def test_paper_suite_without_data_names_each_missing_dataset(tmp_path, capsys):
    from vlsafe.eval import benchmarks
    from vlsafe.eval.run import load_suite

    out = tmp_path / "paper"
    assert main(["eval", "--model", "pico", "--suite", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    names = [entry.benchmark for entry in load_suite("paper")[1].entries]
    assert set(names) == {"sorry_bench", "wildjailbreak", "mmsafetybench", "siuo", "figstep", "xstest", "mmbench",
                          "mme", "seed_bench"}
    assert err[0].startswith("error: suite paper needs 9 published dataset(s)") and len(err) == 10
    for name, line in zip(names, err[1:]):
        assert line.removeprefix("error:").strip().startswith(f"{name}: published at {benchmarks.get(name).published}")
        assert f"--data {name}=PATH" in line
    assert not out.exists()
    # given some of the data, only the rest is missing
    assert main(["eval", "--model", "pico", "--suite", "paper", "--out", str(out),
                 "--data", f"xstest={FORMAT_FIXTURES / PUBLISHED['xstest']}"]) == 2
    err = capsys.readouterr().err
    assert "needs 8 published" in err and " xstest:" not in err and not out.exists()


def test_data_option_points_a_suite_entry_at_local_data(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("seed: 0\nmax_new_tokens: 2\nentries:\n  - {benchmark: xstest, sample: 3}\n")
    out = tmp_path / "run"
    assert main(["eval", "--model", "pico", "--suite", str(suite), "--out", str(out), "--cache",
                 str(tmp_path / "c.sqlite"), "--judge", "refusal-patterns",
                 "--data", f"xstest={FORMAT_FIXTURES / PUBLISHED['xstest']}"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["data"] == {"xstest": str(FORMAT_FIXTURES / PUBLISHED["xstest"])}
    assert {r["benchmark"] for r in report["results"]} == {"xstest"} and report["benchmarks"][0]["sha256"]
    for bad, needle in ((["--data", "nope=x.csv"], "--data nope: suite s has no entry 'nope'"),
                        (["--data", "xstest"], "expected NAME=PATH")):
        assert main(["eval", "--model", "pico", "--suite", str(suite), "--out", str(tmp_path / "x"), *bad]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("entry,needle", [
    ("{format: xstest, path: missing.csv}", "entry 1 (xstest): benchmark xstest: "),  # + the path, not found
    ("{format: nope, path: x.csv}", "entry 1 (nope): unknown format 'nope'"),
    ("{format: siuo, path: SIUO}", "entry 1 (siuo): "),  # + the record and its absent image
    ("{format: xstest}", "needs a path"),
    ("{benchmark: harmbench, format: xstest, path: x.csv}", "either a benchmark or a format"),
    ("{format: figstep, path: FIGSTEP, conditions: [typo]}", "condition 'typo' is not one of figstep's"),
])
def test_bad_published_entries_exit_2_naming_the_entry(tmp_path, capsys, entry, needle):
    import shutil

    siuo = Path(shutil.copytree(FORMAT_FIXTURES / "siuo", tmp_path / "SIUO"))
    (siuo / "images" / "S-01.png").unlink()  # an image the file names is absent
    entry = entry.replace("SIUO", str(siuo / "siuo_gen.json")).replace("FIGSTEP", str(
        FORMAT_FIXTURES / PUBLISHED["figstep"]))
    suite = tmp_path / "bad.yaml"
    suite.write_text(f"entries:\n  - {entry}\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", "pico", "--suite", str(suite), "--out", str(out), "--cache",
                 str(tmp_path / "c.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    if "missing.csv" in entry:
        assert "missing.csv not found" in err
    if "siuo_gen" in entry:
        assert "image 'S-01.png' not found" in err
    assert not out.exists()


def test_a_suite_reads_its_relative_paths_from_its_own_folder(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "suites"
    shutil.copytree(FORMAT_FIXTURES / "mme", folder / "mme")  # "mme/MME_..." also looks like a hub id
    (folder / "rel.yaml").write_text("max_new_tokens: 2\nentries:\n"
                                     "  - {format: mme, path: mme/MME_Benchmark_release_version, sample: 2}\n")
    monkeypatch.chdir(tmp_path)  # not the suite's folder
    from vlsafe.eval.run import load_suite, resolve

    _, spec = load_suite(str(folder / "rel.yaml"))
    [(entry, bench, prompts)] = resolve("rel", spec, base=folder)
    assert bench.name == "mme" and len(prompts) == 4 and bench.data_hash()
