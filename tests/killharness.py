"""Crash safety: run a real vlsafe command as a subprocess, SIGKILL it at seeded random moments, run the same
command again, and check that the end result equals an uninterrupted run and that nothing looked complete before
it was. Used by tests/test_kill.py (a few kills per command) and by `make test-long` (many).

A command is data (`KillCase`): its argv, the path whose existence means "done", and how to compare two finished
outputs. Adding one (e.g. `vlsafe study`) is one more `KillCase`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SEEDS = [int(s) for s in os.environ.get("VLSAFE_KILL_SEEDS", "0").split(",")]  # one campaign per seed
# keys whose values differ between two runs of the same work (wall time, date, where the run lived)
VOLATILE = {"date", "seconds", "git", "cache", "versions", "elapsed", "time", "timestamp", "created", "path", "out",
            "machine"}


def strip_volatile(obj, extra: frozenset = frozenset()):
    if isinstance(obj, dict):
        return {k: strip_volatile(v, extra) for k, v in obj.items() if k not in VOLATILE and k not in extra}
    if isinstance(obj, list):
        return [strip_volatile(v, extra) for v in obj]
    return obj


def same_json(a: Path, b: Path) -> None:
    left, right = strip_volatile(json.loads(a.read_text())), strip_volatile(json.loads(b.read_text()))
    assert left == right, f"{a} and {b} differ"


def same_files(a: Path, b: Path, pattern: str) -> None:
    names = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.glob(pattern)), (a, b, pattern)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


@dataclass
class KillCase:
    name: str
    argv: Callable[[Path], list[str]]  # vlsafe arguments, given the folder the run writes in
    done: str  # relative path that exists only once the command finished (a results file, a final dir)
    compare: Callable[[Path, Path], None]  # (reference run folder, killed-and-rerun folder) -> asserts
    # after a kill, what may exist: anything under these names must be complete (== reference) or absent
    outputs: tuple[str, ...] = ()
    resumable: bool = False  # True: rerun into the same folder continues (train); False: only a complete
    #                          output blocks a rerun, so a partial one must not be visible under its name
    env: dict = field(default_factory=dict)
    # after a kill of a resumable command: (reference, folder) -> asserts that what looks finished is whole
    check_partial: Callable[[Path, Path], None] | None = None
    where: Callable[[Path], str] | None = None  # after a kill: what the command was doing (for the campaign record)


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_to_end(case: KillCase, folder: Path, timeout: float = 300) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vlsafe.cli", *case.argv(folder)], env=_env(case.env),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{case.name}: {done.stderr[-2000:]}"
    return time.monotonic() - started


def run_and_kill(case: KillCase, folder: Path, after: float) -> bool:
    """Starts the command and SIGKILLs it `after` seconds in; True if it finished first."""
    process = subprocess.Popen([sys.executable, "-m", "vlsafe.cli", *case.argv(folder)], env=_env(case.env),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=after)
        stderr = process.stderr.read().decode(errors="replace")
        # finishing first is fine; failing is not (e.g. a rerun refusing what an earlier kill left)
        assert process.returncode == 0, f"{case.name}: exit {process.returncode}: {stderr[-2000:]}"
        return True
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return False
    finally:
        process.stderr.close()


@dataclass
class Campaign:
    kills: int = 0  # SIGKILLs delivered
    finished_early: int = 0  # runs that ended before their kill time
    landed: list = field(default_factory=list)  # KillCase.where after each kill


def campaign(case: KillCase, root: Path, kills: int, seed: int, reference: Path | None = None) -> Campaign:
    """A reference run; then runs of the same command SIGKILLed at seeded random times, each rerun in the same
    folder, until `kills` kills were delivered; the last folder is run to the end. Every finished folder must
    equal the reference, and none may keep a killed writer's temp folder."""
    rng = random.Random(seed)
    if reference is None:
        reference = root / "reference"
        reference.mkdir(parents=True)
    timing = reference / ".wall-seconds"  # the reference run's duration: kill times are drawn within it
    if not (reference / case.done).exists():
        timing.write_text(str(run_to_end(case, reference)))
    wall = float(timing.read_text())
    result = Campaign()
    runs, folder = 0, None
    # a run that finishes before its kill time ends that folder's sequence; a fresh folder starts the next one,
    # so short commands (a pico merge is mostly imports) still take `kills` SIGKILLs
    for _ in range(3 * kills):
        if result.kills >= kills:
            break
        if folder is None or (folder / case.done).exists():
            if folder is not None:
                case.compare(reference, folder)
            folder = root / f"killed-{seed}-{runs}"
            folder.mkdir(parents=True)
            runs += 1
        # before ~a third of the run only the imports happen; kill anywhere after that, up to the whole run
        finished = run_and_kill(case, folder, after=rng.uniform(0.3, 0.95) * wall)
        result.kills += not finished
        result.finished_early += finished
        if not finished and case.where is not None:
            result.landed.append(case.where(folder))
        check_nothing_looks_complete(case, reference, folder)
    if folder is None:
        folder = root / f"killed-{seed}-0"
        folder.mkdir(parents=True)
    if not (folder / case.done).exists():
        run_to_end(case, folder)
    case.compare(reference, folder)
    # what killed runs left in temp folders is gone once the command has run to the end
    leftovers = [p for p in root.glob(f"killed-{seed}-*/**/*.partial") if not case.resumable]
    assert not leftovers, f"{case.name}: temp folders left behind: {leftovers}"
    return result


def check_nothing_looks_complete(case: KillCase, reference: Path, folder: Path) -> None:
    """After a kill: an output under its final name is whole (equal to the reference), or is not there."""
    if (folder / case.done).exists():
        case.compare(reference, folder)
        return
    if case.check_partial is not None:
        case.check_partial(reference, folder)
    if not case.resumable:
        for name in case.outputs:
            assert not (folder / name).exists(), f"{case.name}: {name} exists although the command did not finish"


def clean(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- vlsafe study
# What two finished runs of one study must share, and what they may not. Compared: the plan (every stage and its
# content key), every finished stage's key, each trained/built/merged model's content hash, each evaluation's
# results.json and every sample's (benchmark, condition, id, response, verdicts), and all of results.json: claims,
# model table, seed spread, dynamics, held-out accuracy, legibility, lineage (keys, hashes, commands) and examples.
# Left out: wall times (`seconds`, `seconds_by_stage`), dates, library versions, the machine (`machine`,
# `machines`) and the git commits (VOLATILE,
# `report_git`): they describe when and where a run happened, not what it computed. Paths that name each run's
# own folder (an eval's model `spec`, its corpus, image paths) are compared with that folder replaced.
STUDY_VOLATILE = frozenset({"seconds_by_stage", "report_git", "answers_from_cache", "machines"})


def _study_json(path: Path, run: Path):
    """A study file's JSON with the run's own folder written as `<run>` and the volatile keys dropped."""
    text = path.read_text().replace(str(run.resolve()), "<run>").replace(str(run), "<run>")
    return strip_volatile(json.loads(text), STUDY_VOLATILE)


def _stage_records(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((out / "stages").glob("*/stage.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return found


def _samples(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["benchmark"], r["condition"], str(r["id"]), r["response"], r.get("verdicts")) for r in rows]


def same_study_stages(reference: Path, folder: Path) -> list[str]:
    """Every stage of `folder` that has a stage.json (finished) equals the reference's stage of the same name: key,
    model content hash, evaluation results and samples. Returns the names checked."""
    theirs = _stage_records(reference)
    ours = _stage_records(folder)
    for name, record in ours.items():
        assert name in theirs, f"study: stage {name} finished but the reference has no such stage"
        assert record["key"] == theirs[name]["key"], f"study: stage {name} finished under another key"
        for output, relative in record["outputs"].items():
            if not isinstance(relative, str) or not (folder / relative).exists():
                if output == "fingerprint":  # a content hash, not a path
                    assert relative == theirs[name]["outputs"][output], f"study: {name} fingerprint differs"
                continue
            mine, ref = folder / relative, reference / theirs[name]["outputs"][output]
            if (mine / "vlsafe.json").is_file():
                sha = lambda d: json.loads((d / "vlsafe.json").read_text()).get("content_sha256")  # noqa: E731
                assert sha(mine) == sha(ref), f"study: model of stage {name} differs from the reference"
            if (mine / "results.json").is_file():
                left, right = _study_json(mine / "results.json", folder), _study_json(ref / "results.json", reference)
                assert left == right, f"study: evaluation of stage {name} differs from the reference"
                assert _samples(mine / "samples.jsonl") == _samples(ref / "samples.jsonl"), f"study: {name} samples"
    return sorted(ours)


def same_study(reference: Path, folder: Path) -> None:
    """A finished study equals the reference: the same plan, every stage equal, and the same report numbers."""
    plan = lambda out: [(s["name"], s["key"]) for s in json.loads((out / "plan.json").read_text())["stages"]]  # noqa
    assert plan(folder) == plan(reference), "study: the plans differ"
    assert same_study_stages(reference, folder) == sorted(name for name, _ in plan(reference))
    left, right = _study_json(folder / "results.json", folder), _study_json(reference / "results.json", reference)
    for part in sorted(set(left) | set(right)):
        assert left.get(part) == right.get(part), f"study: results.json {part!r} differs from the reference"


def study_case(argv: list[str]) -> KillCase:
    """`vlsafe study ARGV --out FOLDER`: resumable (the same command continues a killed run), finished when
    results.json exists; after each kill every stage that looks finished must equal the reference's."""
    return KillCase("study", lambda f: ["study", *argv, "--out", str(f)], done="results.json", compare=same_study,
                    resumable=True, check_partial=lambda ref, f: (same_study_stages(ref, f), None)[1],
                    where=study_stage_killed)


def study_stage_killed(folder: Path) -> str:
    """The stage a killed study was in: the first planned stage without its stage.json (or the report, when every
    stage had finished; or start-up, before the plan was written)."""
    if not (folder / "plan.json").is_file():
        return "start-up"
    for stage in json.loads((folder / "plan.json").read_text())["stages"]:
        if not (folder / "stages" / stage["name"] / "stage.json").is_file():
            return f"{stage['kind']}:{stage['name']}"
    return "report"


PICO_STUDY = ["--profile", "pico"]
_STUDY_REFERENCES: dict[tuple, Path] = {}


def study_reference(tmp_path_factory, argv: list[str] = PICO_STUDY) -> Path:
    """An uninterrupted `vlsafe study ARGV` run, made once per test session (this module is imported once, so
    tests/test_study.py and tests/test_kill.py share it), with its wall time in `.wall-seconds` for the campaign."""
    key = tuple(argv)
    if key not in _STUDY_REFERENCES:
        folder = tmp_path_factory.mktemp("study-reference") / "study"
        folder.mkdir()
        (folder / ".wall-seconds").write_text(str(run_to_end(study_case(argv), folder)))
        _STUDY_REFERENCES[key] = folder
    return _STUDY_REFERENCES[key]
