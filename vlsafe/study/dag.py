"""The study's DAG: stages keyed by content, each finished one recorded, so a rerun does only what changed.

A stage's key is the sha256 of its kind, code version, resolved config, the keys of the stages it reads and the
fingerprints of the external files it reads. Its output lives in `OUT/stages/NAME/`; `stage.json` there (key,
inputs, config, command, seconds, versions, outputs) is written last and atomically, so a stage is finished exactly
when its `stage.json` holds the current key. A stage started but not finished keeps its folder only while its key
still matches (`pending.json`), so a killed training resumes from its last checkpoint; otherwise the folder is
cleared and the stage runs again.

The dry run's cost model (seconds, deliberately simple; the constants are the profile's `cost` section, measured
on the machine the profile targets):
  training    steps x batch_size x tokens_per_example x train_token_s (projector_token_s for stage 1)
  generation  items x max_new_tokens x generate_token_s
  merge       merge_s;  corpus  images x image_s;  every stage  + fixed_s
A CPU without native bf16 trains in fp32 and takes the `cost.fp32` constants where the profile has them; every
estimate is then scaled by the constants' reference matmul peak over this machine's, and by the study LLM's
parameters per token over those the constants were measured with (`cost.reference_params`; vlsafe/study/run.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlsafe.errors import VlsafeError
from vlsafe.io import write_json

STAGE_FILE, PENDING_FILE, LOCK_FILE = "stage.json", "pending.json", ".study.lock"


class StageFailed(VlsafeError):
    """A stage raised: the finished stages stay usable; the message names the stage and the cause."""


@dataclass
class Stage:
    name: str
    kind: str  # what runs it (vlsafe/study/stages.py RUNNERS)
    config: dict  # the resolved settings (part of the key)
    inputs: list[str] = field(default_factory=list)  # stages whose outputs it reads
    files: list[str] = field(default_factory=list)  # external files or folders it reads (fingerprinted)
    models: list[str] = field(default_factory=list)  # model specs it reads that are not files (presets, pico)
    cost_s: float = 0.0  # the dry run's estimate
    command: str = ""  # the `vlsafe` command line that does the same work by hand
    key: str = ""


@dataclass
class Dag:
    stages: dict[str, Stage] = field(default_factory=dict)

    def add(self, stage: Stage) -> Stage:
        if stage.name in self.stages:
            raise VlsafeError(f"stage {stage.name!r} is defined twice")
        self.stages[stage.name] = stage
        return stage

    def order(self) -> list[Stage]:
        """Stages in an order where every input comes first; a missing input or a cycle is an error naming it."""
        for stage in self.stages.values():
            for name in stage.inputs:
                if name not in self.stages:
                    raise VlsafeError(f"stage {stage.name!r} reads stage {name!r}, which the study does not define")
        done: dict[str, bool] = {}  # name -> finished (False while on the current path)
        ordered: list[Stage] = []

        def visit(name: str, path: list[str]) -> None:
            if done.get(name) is False:
                cycle = path[path.index(name):] + [name]
                raise VlsafeError(f"the study's stages form a cycle: {' -> '.join(cycle)}")
            if name in done:
                return
            done[name] = False
            for parent in self.stages[name].inputs:
                visit(parent, path + [name])
            done[name] = True
            ordered.append(self.stages[name])

        for name in self.stages:
            visit(name, [])
        return ordered

    def assign_keys(self, fingerprint: Callable[[str], str]) -> list[Stage]:
        ordered = self.order()
        for stage in ordered:
            stage.key = stage_key(stage, {n: self.stages[n].key for n in stage.inputs},
                                  {f: fingerprint(f) for f in stage.files}, KIND_VERSIONS.get(stage.kind, 0))
        return ordered


CODE_VERSION = 1  # bump when what every stage writes changes
# a kind's own code version (0 where never bumped): bump it when what that kind writes changes, and a finished study
# redoes only those stages and what reads them. eval, legibility 1: a closed-set answer counts only when the reply
# names no other choice (vlsafe.eval.metrics.answer_correct); the answers themselves come back from the cache.
# eval, legibility 2: the generation engine no longer drops the running rows when a group that joined them finishes
# within its first segment (their answers came back empty and were scored as non-answers); those answers were never
# cached, so a rerun generates only them. eval 3: a cached verdict is keyed by the words it judged, not only the
# generation key, so the answers regenerated by 2 are no longer given the verdict of their empty forerunners
KIND_VERSIONS = {"eval": 3, "legibility": 2}


def stage_key(stage: Stage, input_keys: dict[str, str], file_prints: dict[str, str], version: int = 0) -> str:
    body = {"kind": stage.kind, "code": [CODE_VERSION, version], "config": stage.config, "inputs": input_keys,
            "files": file_prints, "models": stage.models}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


BIG = 64 << 20  # files above this are fingerprinted by size and mtime: a rerun must not re-hash 14 GB of weights


def _file_print(file: Path) -> str:
    from vlsafe.io import sha256_file

    stat = file.stat()
    return f"size={stat.st_size},mtime={stat.st_mtime_ns}" if stat.st_size > BIG else sha256_file(file)


def fingerprint(path: str) -> str:
    """A file's sha256 (size and mtime above 64 MB); a folder's hash over its files' names and prints (weights,
    JSON and text are what change results; big image folders are summarised by name and size)."""
    p = Path(path)
    if p.is_file():
        return _file_print(p)
    digest = hashlib.sha256()
    for file in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = file.relative_to(p)
        if file.suffix in (".safetensors", ".json", ".jsonl", ".txt", ".csv", ".yaml", ".model", ".gguf"):
            digest.update(f"{rel}:{_file_print(file)}\n".encode())
        else:
            digest.update(f"{rel}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def finished(out: Path, stage: Stage) -> dict | None:
    """The stage's record when its output is there under the current key."""
    record = out / "stages" / stage.name / STAGE_FILE
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("key") == stage.key else None


class Lock:
    """An OS-level lock on the output folder: released by the kernel when the process dies, so a killed run
    never blocks the next one, while a second live run on the same folder is refused."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise VlsafeError(f"{self.path.parent}: another study is running on this folder ({holder}); wait for "
                              "it to finish or choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def run_stage(out: Path, stage: Stage, runner: Callable[[Path], dict]) -> dict:
    """Runs one stage into OUT/stages/NAME and records it; returns its record."""
    from vlsafe.io import machine, versions

    folder = out / "stages" / stage.name
    pending = folder / PENDING_FILE
    if folder.exists():
        same = pending.is_file() and json.loads(pending.read_text() or "{}").get("key") == stage.key
        if not same:  # another key's output, or a foreign folder: nothing of it can be reused
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGE_FILE).unlink(missing_ok=True)
    write_json(pending, {"key": stage.key})
    began = time.time()
    try:
        outputs = runner(folder)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - any failure is reported as this stage's, with its cause
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        write_json(out / "failed.json", {"stage": stage.name, "error": f"{type(err).__name__}: {message}"})
        raise StageFailed(f"stage {stage.name!r} failed: {type(err).__name__}: {message} (finished stages are kept; "
                          f"fix it and run the same command again)") from err
    record = {"name": stage.name, "kind": stage.kind, "key": stage.key, "inputs": stage.inputs,
              "files": stage.files, "models": stage.models, "config": stage.config, "command": stage.command,
              "seconds": round(time.time() - began, 2), "estimated_seconds": round(stage.cost_s, 1),
              "outputs": outputs, "versions": versions(), "machine": machine(), "git": _git()}
    write_json(folder / STAGE_FILE, record)
    pending.unlink(missing_ok=True)
    return record


def _git() -> str | None:
    from vlsafe.eval.run import git_hash

    return git_hash()
