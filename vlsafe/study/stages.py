"""What each kind of study stage does: one function per kind, each calling the one library entry point that does
that work by hand (`vlsafe data synth`, `safety ...`, `train`, `build`, `merge`, `eval`, `analyze`).

A runner gets the stage, its folder and the run context, and returns its outputs as paths relative to the study
folder (what later stages read, through `@STAGE:OUTPUT/sub/path` references in their config).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlsafe.errors import VlsafeError
from vlsafe.progress import scope

RESUMABLE = {"train"}  # kinds whose partial folder is kept across a kill (training resumes from its checkpoint)


def ref(stage: str, output: str, sub: str = "") -> str:
    """A reference to another stage's output, resolved when the stage runs (its path is known only then)."""
    return f"@{stage}:{output}" + (f"/{sub}" if sub else "")


def ref_stage(value: Any) -> str | None:
    return value[1:].split(":", 1)[0] if isinstance(value, str) and value.startswith("@") else None


@dataclass
class Context:
    out: Path
    records: dict[str, dict] = field(default_factory=dict)  # finished stages' stage.json
    log: Callable[[str], Any] = print
    show_progress: bool = True

    @property
    def cache(self) -> str:
        return str(self.out / "cache" / "eval.sqlite")

    def resolve(self, value: Any) -> Any:
        """References (`@STAGE:OUTPUT/sub`) in a config value become absolute paths, recursively."""
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        name = ref_stage(value)
        if name is None:
            return value
        output, _, sub = value.split(":", 1)[1].partition("/")
        base = self.out / self.records[name]["outputs"][output]
        return str(base / sub) if sub else str(base)


def _clear(folder: Path, keep: tuple[str, ...] = ("pending.json",)) -> None:
    for entry in folder.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def rel(ctx: Context, path: Path) -> str:
    return str(Path(path).resolve().relative_to(ctx.out.resolve()))


# ------------------------------------------------------------------------------------------------------- data
def run_corpus(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.data.synthetic import write_corpus

    write_corpus(folder / "corpus", n=config["n"], seed=config["seed"])
    return {"corpus": rel(ctx, folder / "corpus")}


def run_align_data(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.safety.align import build

    build(folder / "data", ctx.resolve(config["model"]), n_harmful=config["n_harmful"], seed=config["seed"],
          max_new_tokens=config["max_new_tokens"], cache_path=ctx.cache, show_progress=ctx.show_progress)
    return {"data": rel(ctx, folder / "data" / "align.jsonl")}


def run_control_data(ctx: Context, config: dict, folder: Path) -> dict:
    """The stage-2 conversations as text only: the same instructions and answers, the image dropped."""
    from vlsafe.data import formats
    from vlsafe.io import atomic_dir
    from vlsafe.safety import jsonl

    source = ctx.resolve(config["data"])
    records = formats.loader(source["format"])(source["path"], image_root=source.get("image_root"))
    text_only = [r.model_copy(update={"image": None, "id": f"text-{r.id}", "meta": {**r.meta, "kind": "text_only"}})
                 for r in records]
    with atomic_dir(folder / "data") as tmp:
        jsonl.save(text_only, tmp / "control.jsonl")
    return {"data": rel(ctx, folder / "data" / "control.jsonl"), "records": len(text_only)}


def run_vlguard_like(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.safety.vlguard_like import build

    build(ctx.resolve(config["corpus"]), folder / "data", n=config["n"], seed=config["seed"])
    return {"data": rel(ctx, folder / "data" / "train.json")}


def run_pairs(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.safety.pairs import build

    build(ctx.resolve(config["model"]), folder / "data", n_harmful=config["n_harmful"], n_benign=config["n_benign"],
          seed=config["seed"], max_new_tokens=config["max_new_tokens"], images=ctx.resolve(config["images"]),
          cache_path=ctx.cache, show_progress=ctx.show_progress)
    return {"data": rel(ctx, folder / "data" / "pairs.jsonl")}


# ------------------------------------------------------------------------------------------------------ models
def run_build(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.model import checkpoint

    llm = ctx.resolve(config["llm"])
    bundle = checkpoint.build_vlm(llm, config["tower"], feature_layer=config.get("feature_layer"), seed=config["seed"])
    checkpoint.save(bundle, folder / "model", provenance={"command": "study", **config})
    return {"model": rel(ctx, folder / "model")}


def run_save_llm(ctx: Context, config: dict, folder: Path) -> dict:
    """The base LLM as a safetensors folder (a preset, 'pico' or a hub id has none), for merges that read it."""
    from vlsafe.model import checkpoint

    checkpoint.save(checkpoint.load(config["llm"]), folder / "model", provenance={"command": "study", **config})
    return {"model": rel(ctx, folder / "model")}


def run_train(ctx: Context, config: dict, folder: Path) -> dict:
    """`vlsafe train` of the resolved config into FOLDER/run; rerun on the same folder, it resumes."""
    import yaml

    settings = ctx.resolve(config["train"])
    accelerate = settings.pop("accelerate", None)
    settings["out"] = str(folder / "run")
    config_file = folder / "train.yaml"
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    final = folder / "run" / "final"
    if not (final / "vlsafe.json").is_file():
        if accelerate:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate),
                       "-m", "vlsafe.cli", "train", str(config_file)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise VlsafeError(f"accelerate launch ({accelerate}) exited with {done.returncode}: {tail[0]}")
        else:
            from vlsafe.train.config import load_train_config
            from vlsafe.train.engine import train

            train(load_train_config(config_file), show_progress=ctx.show_progress)
    checkpoints = sorted((p for p in (folder / "run" / "checkpoints").glob("step-*") if p.is_dir()),
                         key=lambda p: int(p.name.split("-")[1]))
    for step in checkpoints:  # the run is final: what a resume would read (1.6 GB a step for SmolLM2) goes
        shutil.rmtree(step / "training_state", ignore_errors=True)
    return {"model": rel(ctx, final), "run": rel(ctx, folder / "run"),
            "checkpoints": [rel(ctx, p) for p in checkpoints]}


def run_merge(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.merge import config as merge_config
    from vlsafe.merge.engine import run

    import yaml

    data = ctx.resolve(config["merge"])
    (folder / "merge.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    parsed = merge_config.parse(data, f"stage {folder.name}")
    summary = run(parsed, folder / "model", config_dir=ctx.out, progress=False)
    return {"model": rel(ctx, folder / "model"), "summary": summary}


# --------------------------------------------------------------------------------------------------- measuring
def run_suite(ctx: Context, config: dict, folder: Path) -> dict:
    import yaml

    (folder / "suite.yaml").write_text(yaml.safe_dump(config["suite"], sort_keys=False))
    return {"suite": rel(ctx, folder / "suite.yaml")}


def run_eval(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.eval.run import evaluate

    producer = ref_stage(config["model"])
    if producer and "skipped" in ctx.records[producer]["outputs"]:  # a proposed merge the analysis did not support
        return {"skipped": f"{producer}: {ctx.records[producer]['outputs']['skipped']}"}

    report = evaluate(ctx.resolve(config["model"]), ctx.resolve(config["suite"]), folder / "eval",
                      judges=config.get("judges"), corpus=ctx.resolve(config["corpus"]), cache_path=ctx.cache,
                      batch_size=config["batch_size"], dtype=config["dtype"], log=lambda m: None,
                      show_progress=ctx.show_progress)
    return {"eval": rel(ctx, folder / "eval"), "fingerprint": report["model"]["fingerprint"],
            "judges": report["judges"]}


def run_legibility(ctx: Context, config: dict, folder: Path) -> dict:
    from vlsafe.io import write_json
    from vlsafe.study.legibility import probe

    result = probe(ctx.resolve(config["model"]), folder / "images", n=config["n"], seed=config["seed"],
                   cache_path=ctx.cache, max_new_tokens=config["max_new_tokens"])
    write_json(folder / "legibility.json", result)
    return {"legibility": rel(ctx, folder / "legibility.json"), "perceived": result["perceived"]}


def run_analysis(ctx: Context, config: dict, folder: Path) -> dict:
    """The layer analysis of `vlsafe.analysis` (imported only when a study switches it on): weight changes and
    task-vector cosines over VLM@1 -> adapted -> safety-tuned, and the adapted VLM's activation safety layers."""
    from vlsafe.analysis import activations, weights
    from vlsafe.io import write_json

    names = config["names"]  # the base first
    paths = [ctx.resolve(m) for m in config["models"]]
    weights.analyze(paths[0], paths[1:], folder / "weights", names=names, pairs=config["pairs"],
                    progress=ctx.show_progress)
    activations.analyze(ctx.resolve(config["adapted"]), folder / "activations",
                        reference=ctx.resolve(config["aligned"]), conditions=tuple(config["conditions"]),
                        corpus=ctx.resolve(config["corpus"]), progress=ctx.show_progress)
    merged = {}
    for part in ("weights", "activations"):
        merged.update(json.loads((folder / part / "analysis.json").read_text()))
    write_json(folder / "analysis.json", merged)
    return {"analysis": rel(ctx, folder / "analysis.json"), "folder": rel(ctx, folder)}


def run_analysis_merge(ctx: Context, config: dict, folder: Path) -> dict:
    """A merge built by `vlsafe.analysis.merges` from what the analysis found (safety layers, per-layer update
    cosines) or from the published recipes (RESTA, ExPO), then run like any merge. When the analysis found nothing
    to act on (no safety layers, no layer where the updates disagree) the stage records why instead of a model."""
    try:
        merge = _proposed_merge(ctx, config["builder"], ctx.resolve(config["args"]))
    except VlsafeError as err:  # the analysis found nothing this merge could act on: recorded, not a failure
        return {"skipped": str(err)}
    return run_merge(ctx, {"merge": merge}, folder)


def _proposed_merge(ctx: Context, builder: str, args: dict) -> dict:
    from vlsafe.analysis import merges

    if builder in ("safety_layers", "gated"):
        analysis = json.loads((ctx.out / ctx.records["analysis"]["outputs"]["analysis"]).read_text())
        if builder == "safety_layers":
            span = (analysis.get("safety_layers") or {}).get("layer_range")
            if not span:
                raise VlsafeError("the layer analysis located no safety layers: no safety-layer merge to build")
            merge = merges.safety_layer_merge(args["adapted"], args["aligned"], tuple(span))
        else:
            first = next(r for r in analysis["task_vectors"])
            cosines = {r["layer"]: r["cosine"] for r in analysis["task_vectors"]
                       if r["layer"] is not None and (r["a"], r["b"]) == (first["a"], first["b"])}
            merge = merges.cosine_gated_merge(args["adapted"], args["safer"], cosines)
        return merge
    if builder == "resta":
        return merges.resta(args["adapted"], args["aligned"], args["unaligned"])
    return merges.expo(args["sft"], args["parent"])


RUNNERS: dict[str, Callable[[Context, dict, Path], dict]] = {
    "corpus": run_corpus, "align-data": run_align_data, "control-data": run_control_data,
    "vlguard-like": run_vlguard_like, "pairs": run_pairs, "build": run_build, "save-llm": run_save_llm,
    "train": run_train,
    "merge": run_merge, "suite": run_suite, "eval": run_eval, "legibility": run_legibility,
    "analysis": run_analysis, "analysis-merge": run_analysis_merge,
}


def runner(ctx: Context, kind: str, config: dict) -> Callable[[Path], dict]:
    def run(folder: Path) -> dict:
        if kind not in RESUMABLE:
            _clear(folder)  # a killed non-training stage starts over (its generations are cached)
        with scope(folder.name):  # progress lines name the study stage, not only the work it runs
            return RUNNERS[kind](ctx, config, folder)

    return run
