"""Training-data formats: LLaVA JSON (load, save, round trip), VLGuard train, PKU-SafeRLHF and SPA-VL.

Fixtures are in the exact published layouts with the project's own harmless text. Every bad case goes through
the real command line (`vlsafe data inspect`) and must exit 2 with one line naming the file and the record.
"""

import json
import shutil
from pathlib import Path

import pytest

from vlsafe.cli import main
from vlsafe.data.formats import llava, preference, vlguard
from vlsafe.data.records import Conversation, Turn

FIXTURES = Path(__file__).parent / "fixtures"
LLAVA = FIXTURES / "llava" / "instruct.json"
VLGUARD = FIXTURES / "vlguard_train"
SAFERLHF = FIXTURES / "preference" / "PKU-SafeRLHF"
SPAVL = FIXTURES / "preference" / "SPA-VL"


def inspect(capsys, path, fmt, *extra) -> tuple[int, str, str]:
    code = main(["data", "inspect", str(path), "--format", fmt, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_naming(capsys, path, fmt, *needles, extra=()):
    code, _, err = inspect(capsys, path, fmt, *extra)
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and str(path) in line, line
    for needle in needles:
        assert needle in line, (needle, line)


# ---------------------------------------------------------------------------------------------------- LLaVA
def test_llava_fixture_loads_with_placeholders_stripped(capsys):
    records = llava.load(LLAVA)
    assert [c.id for c in records] == ["000000000001", "000000000002", "3", "000000000004", "000000000005"]
    assert all("<image>" not in t.content for c in records for t in c.turns)
    assert records[0].turns[0].content == "What colour is the square?" and len(records[0].turns) == 4
    assert records[2].image is None, "text-only records are allowed"
    assert Path(records[0].image) == (LLAVA.parent / "images" / "red_square.png").resolve()
    assert [c.meta.get("image_placement", "start") for c in records if c.image] == ["start", "end", "start", "none"]
    code, out, _ = inspect(capsys, LLAVA, "llava")
    assert code == 0 and json.loads(out)["records"] == 5


def test_llava_round_trip(tmp_path):
    records = llava.load(LLAVA)
    llava.save(records, tmp_path / "out.json", LLAVA.parent)
    again = llava.load(tmp_path / "out.json", image_root=LLAVA.parent)
    assert [c.model_dump() for c in again] == [c.model_dump() for c in records]
    raw = json.loads((tmp_path / "out.json").read_text())
    assert raw[0]["image"] == "images/red_square.png" and "image" not in raw[2]
    assert raw[0]["conversations"][0]["value"] == "<image>\nWhat colour is the square?"
    assert raw[1]["conversations"][0]["value"].endswith("\n<image>")


def write_llava(tmp_path: Path, records) -> Path:
    shutil.copytree(LLAVA.parent / "images", tmp_path / "images", dirs_exist_ok=True)
    path = tmp_path / "data.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def record(rid, *turns, image="images/red_square.png"):
    out = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image:
        out["image"] = image
    return out


GOOD = record("good", ("human", "<image>\nWhat is it?"), ("gpt", "A red square."))
BAD = {
    "missing image": (record("r1", ("human", "<image>\nHi"), ("gpt", "Hello"), image="images/nope.png"), "not found"),
    "gpt first": (record("r2", ("gpt", "Hello"), ("human", "<image>\nHi")), "turn 0"),
    "two humans": (record("r3", ("human", "<image>\nHi"), ("human", "Again")), "alternate"),
    "unknown speaker": (record("r4", ("user", "<image>\nHi"), ("gpt", "Hello")), "'user'"),
    "placeholder without image": (record("r5", ("human", "<image>\nHi"), ("gpt", "Hello"), image=None),
                                  "without an image"),
    "two placeholders": (record("r6", ("human", "<image>\nHi <image>"), ("gpt", "Hello")), "more than one"),
    "placeholder in answer": (record("r7", ("human", "Hi"), ("gpt", "<image> Hello")), "only human turns"),
    "ends with human": (record("r8", ("human", "<image>\nHi"), ("gpt", "Yes"), ("human", "And?")), "ends with"),
    "unreadable image": (record("r9", ("human", "<image>\nHi"), ("gpt", "Hello"), image="images/broken.png"),
                         "unreadable"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_llava_bad_record_exits_2_naming_it(tmp_path, capsys, case):
    bad, reason = BAD[case]
    path = write_llava(tmp_path, [GOOD, bad])
    (tmp_path / "images" / "broken.png").write_bytes((tmp_path / "images" / "red_square.png").read_bytes()[:40])
    fails_naming(capsys, path, "llava", "record 1", f"id '{bad['id']}'", reason)


def test_llava_bad_files_exit_2(tmp_path, capsys):
    fails_naming(capsys, write_llava(tmp_path, '[{"id": 1,'), "llava", "malformed JSON")
    fails_naming(capsys, write_llava(tmp_path, '{"id": 1}'), "llava", "JSON list")


def test_llava_skip_bad_counts_and_names(tmp_path):
    (tmp_path / "images").mkdir()
    path = write_llava(tmp_path, [GOOD] + [BAD[c][0] for c in ("missing image", "gpt first", "two placeholders")])
    loaded = llava.load(path, skip_bad=True)
    assert [c.id for c in loaded] == ["good"] and len(loaded.skipped) == 3
    assert all(f"id '{rid}'" in why for rid, why in zip(("r1", "r2", "r6"), loaded.skipped))


def test_llava_save_refuses_a_system_turn(tmp_path):
    conv = Conversation(id="s", turns=[Turn(role="system", content="Be brief."), Turn(role="user", content="Hi"),
                                       Turn(role="assistant", content="Hello")])
    with pytest.raises(Exception, match="system turn"):
        llava.save([conv], tmp_path / "x.json", tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- VLGuard train
def test_vlguard_fixture(capsys):
    records = vlguard.load(VLGUARD)
    kinds = [(c.id, c.meta["instruction_kind"], c.meta["safe_image"]) for c in records]
    assert kinds == [("Fixture_000001:harmful_image", "harmful_image", False), ("Fixture_000002:safe", "safe", True),
                     ("Fixture_000002:unsafe", "unsafe", True), ("Fixture_000003:unsafe", "unsafe", True),
                     ("Fixture_000003:safe", "safe", True)]
    assert records[0].meta["harmful_category"] == "placeholder category"
    assert all(Path(c.image).is_file() and len(c.turns) == 2 for c in records)
    assert records[1].turns[1].content == "The circle is blue."
    code, out, _ = inspect(capsys, VLGUARD / "train.json", "vlguard")
    assert code == 0 and json.loads(out)["records"] == 5


@pytest.mark.parametrize("case, change, reason", [
    ("mismatch", lambda r: r.update(safe=True), "marked safe=True"),
    ("missing image", lambda r: r.update(image="samples/missing.png"), "not found"),
    ("empty response", lambda r: r["instr-resp"][0].update(response=" "), "empty field 'response'"),
    ("no pairs", lambda r: r.update({"instr-resp": []}), "instr-resp"),
    ("safe not bool", lambda r: r.update(safe="no"), "'safe'"),
])
def test_vlguard_bad_record_exits_2(tmp_path, capsys, case, change, reason):
    shutil.copytree(VLGUARD, tmp_path / "vg")
    data = json.loads((VLGUARD / "train.json").read_text())
    change(data[0])
    (tmp_path / "vg" / "train.json").write_text(json.dumps(data))
    fails_naming(capsys, tmp_path / "vg" / "train.json", "vlguard", "record 0", "Fixture_000001", reason)
    assert len(vlguard.load(tmp_path / "vg", skip_bad=True).skipped) == 1


# ---------------------------------------------------------------------------------------------- preferences
def test_saferlhf_fixture_prefers_safer_or_better(capsys):
    safer = preference.load_saferlhf(SAFERLHF)
    assert len(safer) == 4 and {p.id.split(":")[1].split("/")[0] for p in safer} == {"Alpaca-7B", "Alpaca2-7B"}
    assert safer[0].chosen.startswith("Placeholder answer B") and safer[0].meta["is_chosen_safe"] is True
    assert safer[0].meta["is_rejected_safe"] is False
    better = preference.load_saferlhf(SAFERLHF, prefer="better")
    assert better[0].chosen.startswith("Placeholder answer A") and better[2].chosen.startswith("Placeholder answer D")
    code, out, _ = inspect(capsys, SAFERLHF, "saferlhf")
    assert code == 0 and json.loads(out)["records"] == 4


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.update(response_1=r["response_0"]), "identical"),
    (lambda r: r.update(response_0=""), "empty"),
    (lambda r: r.update(safer_response_id=2), "'safer_response_id' should be 0 or 1"),
    (lambda r: r.pop("prompt"), "missing field 'prompt'"),
])
def test_saferlhf_bad_record_exits_2(tmp_path, capsys, change, reason):
    rows = [json.loads(line) for line in (SAFERLHF / "data/Alpaca-7B/train.jsonl").read_text().splitlines()]
    change(rows[1])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails_naming(capsys, path, "saferlhf", "line 2", reason)


def test_spavl_parquet_and_json_exports(tmp_path, capsys):
    pairs = preference.load_spavl(SPAVL, extract_dir=tmp_path / "images")
    assert [p.prompt for p in pairs][1] == "What colour is the square?" and len(pairs) == 2
    assert all(Path(p.image).parent == tmp_path / "images" and Path(p.image).is_file() for p in pairs)
    assert (tmp_path / "images" / Path(pairs[0].image).name).read_bytes() == (
        FIXTURES / "preference/images/pic_0.png").read_bytes()
    exported = preference.load_spavl(FIXTURES / "preference/spavl_export.jsonl")
    assert [Path(p.image).name for p in exported] == ["pic_0.png", "pic_1.png"]
    assert exported[1].meta["class1"] == "placeholder domain"
    code, out, _ = inspect(capsys, FIXTURES / "preference/spavl_export.jsonl", "spavl")
    assert code == 0 and json.loads(out)["records"] == 2 and json.loads(out)["with_image"] == 2


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.update(image="images/gone.png"), "'images/gone.png' not found"),
    (lambda r: r.update(rejected=r["chosen"]), "identical"),
    (lambda r: r.update(chosen="   "), "chosen response is empty"),
])
def test_spavl_bad_record_exits_2(tmp_path, capsys, change, reason):
    shutil.copytree(FIXTURES / "preference/images", tmp_path / "images")
    rows = [json.loads(x) for x in (FIXTURES / "preference/spavl_export.jsonl").read_text().splitlines()]
    change(rows[0])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails_naming(capsys, path, "spavl", "line 1", reason)
    assert len(preference.load_spavl(path, skip_bad=True).skipped) == 1
