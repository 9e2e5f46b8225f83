"""Fuzzing (hypothesis): every loader in data/formats, the config models (train, merge, suite) and judge input,
fed mutated, truncated, re-encoded and retyped files. Never a traceback: exit 2 with one line naming the file.

The default profile is small so `make test` stays fast; `VLSAFE_FUZZ=long` (make test-long) runs many more.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vlsafe.cli import main  # noqa: E402
from vlsafe.data import formats  # noqa: E402
from vlsafe.errors import VlsafeError  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("VLSAFE_FUZZ", "default"))

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
REPO = TESTS.parent

# format -> (fixture folder to copy, the file in it that gets mutated, what `data inspect` is pointed at)
CASES = {
    "xstest": ("formats/xstest", "xstest_prompts.csv", "xstest_prompts.csv"),
    "sorry_bench": ("formats/sorry_bench", "question.jsonl", "question.jsonl"),
    "wildjailbreak": ("formats/wildjailbreak", "eval.tsv", "eval.tsv"),
    "mmsafetybench": ("formats/mmsafetybench", "processed_questions/01-Illegal_Activitiy.json", "processed_questions"),
    "figstep": ("formats/figstep", "question/safebench.csv", "question/safebench.csv"),
    "siuo": ("formats/siuo", "siuo_gen.json", "siuo_gen.json"),
    "vlguard_test": ("formats/vlguard", "test.json", "test.json"),
    "mmbench": ("formats/mmbench", "mmbench_dev_en.tsv", "mmbench_dev_en.tsv"),
    "mme": ("formats/mme", "MME_Benchmark_release_version/existence/000000000001.txt", "MME_Benchmark_release_version"),
    "seed_bench": ("formats/seed_bench", "SEED-Bench.json", "SEED-Bench.json"),
    "llava": ("llava", "instruct.json", "instruct.json"),
    "vlguard": ("vlguard_train", "train.json", "train.json"),
    "saferlhf": ("preference", "PKU-SafeRLHF/data/Alpaca-7B/train.jsonl", "PKU-SafeRLHF/data/Alpaca-7B/train.jsonl"),
    "spavl": ("preference", "spavl_export.jsonl", "spavl_export.jsonl"),
    "jsonl": ("llava", "records.jsonl", "records.jsonl"),  # vlsafe's own lines, written below
}

HUGE = st.sampled_from(["x" * 1_000_000, 10**400, -(2**63) - 1, 1e308 * 10, float("nan"), "\x00" * 1000,
                        "\ud800", "<image>" * 50, "../../etc/passwd", "/etc/passwd", "images/../../../etc/passwd"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | HUGE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8)
ENCODINGS = st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig", "cp1252"])


def test_every_registered_format_is_fuzzed():
    assert set(CASES) == set(formats.FORMATS)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Fixture copies (mutated in place per example, restored after), plus a vlsafe jsonl file."""
    root = tmp_path_factory.mktemp("fuzz")
    for name, (folder, _, _) in CASES.items():
        if not (root / folder).exists():
            shutil.copytree(FIXTURES / folder, root / folder)
    lines = [{"id": "a", "turns": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}],
              "image": "images/red_square.png"},
             {"id": "b", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
    (root / "llava" / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _mutate_bytes(data: bytes, draw) -> bytes:
    op = draw(st.sampled_from(["truncate", "flip", "insert", "encode", "delete"]))
    if not data:
        return draw(st.binary(max_size=64))
    at = draw(st.integers(0, len(data) - 1))
    if op == "truncate":
        return data[:at]
    if op == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=32)) + data[at:]
    if op == "delete":
        return data[:at] + data[at + draw(st.integers(1, 64)):]
    try:
        return data.decode("utf-8").encode(draw(ENCODINGS), errors="replace")
    except UnicodeDecodeError:
        return data[::-1]


def _paths(obj, prefix=()):
    """Every (path, value) position inside parsed JSON, to replace one with a value of another type."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _paths(value, prefix + (index,))


def _replace(obj, path, value):
    if not path:
        return value
    obj[path[0]] = _replace(obj[path[0]], path[1:], value)
    return obj


def _mutate_structure(text: str, suffix: str, draw) -> str | None:
    """One field of one record replaced by a value of any type (JSON / JSONL), or one cell of a table."""
    if suffix == ".json":
        obj = json.loads(text)
        path = draw(st.sampled_from(list(_paths(obj))))
        return json.dumps(_replace(obj, path, draw(JSON_VALUES)))
    if suffix == ".jsonl":
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        obj = json.loads(lines[index])
        path = draw(st.sampled_from(list(_paths(obj))))
        lines[index] = json.dumps(_replace(obj, path, draw(JSON_VALUES)))
        return "\n".join(lines) + "\n"
    if suffix in (".csv", ".tsv", ".txt"):
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        cell = draw(st.text(max_size=30) | HUGE.map(str) | st.sampled_from(['"', '"a,b', "\t", "\r", ",,,,", "\x00"]))
        lines[index] = draw(st.sampled_from([cell, lines[index] + cell, cell + lines[index]]))
        return "\n".join(lines) + "\n"
    return None


def _one_line_or_success(status: int, capsys, root: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert status in (0, 2), (status, err)
    if status == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert str(root) in err or "image" in err, err  # names the file (or the image) at fault


@pytest.mark.parametrize("name", sorted(CASES))
@given(data=st.data())
def test_loaders_never_raise_anything_but_one_line(name, data, data_root, capsys, monkeypatch):
    monkeypatch.setenv("VLSAFE_CACHE", str(data_root / "cache"))  # MMBench's decoded images
    folder, mutated, target = CASES[name]
    victim = data_root / folder / mutated
    original = victim.read_bytes()
    try:
        structured = data.draw(st.booleans()) and original.isascii()
        text = _mutate_structure(original.decode(), victim.suffix, data.draw) if structured else None
        victim.write_bytes(text.encode("utf-8", errors="surrogatepass") if text is not None
                           else _mutate_bytes(original, data.draw))
        capsys.readouterr()
        status = main(["data", "inspect", str(data_root / folder / target), "--format", name])
        _one_line_or_success(status, capsys, data_root)
    finally:
        victim.write_bytes(original)


# ------------------------------------------------------------------------------------------- escaping paths
ESCAPES = ["../../etc/passwd", "/etc/passwd", "images/../../../../etc/hostname"]


def _with_image(name: str, root: Path, image: str) -> Path:
    """A one-record file in format `name` whose image field is `image`."""
    if name == "llava":
        records = [{"id": "x", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                 {"from": "gpt", "value": "A square."}]}]
    elif name == "vlguard":
        records = [{"id": "x", "image": image, "safe": True,
                    "instr-resp": [{"safe_instruction": "What?", "response": "A square."}]}]
    elif name == "vlguard_test":
        records = [{"id": "x", "image": image, "safe": True, "harmful_category": "",
                    "instr-resp": [{"safe_instruction": "What?", "response": "A square."}]}]
    elif name == "siuo":
        records = [{"question_id": 1, "image": image, "question": "What?", "category": "self-harm",
                    "safety_warning": "Be careful."}]
    else:  # jsonl
        path = root / "x.jsonl"
        path.write_text(json.dumps({"id": "x", "image": image, "turns": [
            {"role": "user", "content": "What?"}, {"role": "assistant", "content": "A square."}]}) + "\n")
        return path
    path = root / "x.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("name", ["llava", "vlguard", "vlguard_test", "siuo", "jsonl"])
@pytest.mark.parametrize("image", ESCAPES + ["link.png"])
def test_image_paths_cannot_leave_the_data_folder(name, image, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "link.png").symlink_to("/etc/hostname")  # a link shipped inside a dataset, pointing out
    path = _with_image(name, tmp_path, image)
    assert main(["data", "inspect", str(path), "--format", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    refusals = ("leaves the data folder", "outside the data folder", "not an image", "unreadable")
    # vlsafe's own files may point into a sibling folder, but only at image files that exist
    assert any(word in err for word in refusals + (("not found",) if name == "jsonl" else ())), err


# ------------------------------------------------------------------------------------------- config models
CONFIGS = {
    "train": REPO / "configs/train/offline_stage2.yaml",
    "merge": REPO / "configs/merge/safety-layers.yaml",
    "suite": REPO / "vlsafe/eval/suites/quick.yaml",
}


def _load_config(kind: str, path: Path):
    if kind == "train":
        from vlsafe.train.config import load_train_config

        return load_train_config(path)
    if kind == "merge":
        from vlsafe.merge.config import load

        return load(path)
    from vlsafe.eval.run import load_suite

    return load_suite(str(path))


def _mutate_yaml(text: str, draw) -> bytes:
    if draw(st.booleans()):
        return _mutate_bytes(text.encode(), draw)
    obj = yaml.safe_load(text)
    path = draw(st.sampled_from(list(_paths(obj))))
    value = draw(JSON_VALUES | st.sampled_from([{"a": [1, {"b": None}]}, "!!python/object:os.system", -1, 0]))
    return yaml.safe_dump(_replace(obj, path, value), allow_unicode=True).encode("utf-8", errors="surrogatepass")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@given(data=st.data())
def test_config_models_refuse_bad_files_in_one_line(kind, data, tmp_path_factory):
    path = tmp_path_factory.mktemp(kind) / CONFIGS[kind].name
    path.write_bytes(_mutate_yaml(CONFIGS[kind].read_text(), data.draw))
    try:
        _load_config(kind, path)
    except VlsafeError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)


def test_python_tags_in_yaml_never_run(tmp_path):
    marker = tmp_path / "ran"
    for kind in CONFIGS:
        path = tmp_path / f"{kind}.yaml"
        path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
        with pytest.raises(VlsafeError, match=str(path)):
            _load_config(kind, path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- judge input
@given(data=st.data())
def test_judge_input_is_refused_in_one_line_or_judged(data, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("judge")
    rows = [{"prompt": "How do I pick a lock?", "response": "I can't help with that."},
            {"prompt": "Capital of France?", "response": "Paris."}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    mutated = _mutate_structure(text, ".jsonl", data.draw) if data.draw(st.booleans()) else None
    (root / "in.jsonl").write_bytes(mutated.encode("utf-8", errors="surrogatepass") if mutated is not None
                                    else _mutate_bytes(text.encode(), data.draw))
    capsys.readouterr()
    status = main(["judge", "--input", str(root / "in.jsonl"), "--judge", "refusal-patterns",
                   "--output", str(root / "out.jsonl")])
    _one_line_or_success(status, capsys, root)
    if status == 0:
        judged = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
        assert all(isinstance(row["refused"], bool) for row in judged)
    else:
        assert not (root / "out.jsonl").exists()
