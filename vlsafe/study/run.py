"""`vlsafe study`: plan the DAG, check every input, run what is not done yet, then claims and report.

Layout of OUT:
  study.yaml           the resolved config as run
  plan.json            every stage: kind, inputs, key, estimated seconds, command
  stages/NAME/         each stage's output, with stage.json (written last: the stage is finished)
  cache/eval.sqlite    generations and verdicts, shared by every stage (a resumed eval regenerates nothing)
  results.json, report.md, report.html, plots/     written by `vlsafe report` at the end (vlsafe/report)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from vlsafe.errors import VlsafeError
from vlsafe.study.config import StudyConfig, load_study
from vlsafe.study.dag import Lock, Stage, fingerprint, finished, run_stage
from vlsafe.study.plan import Plan, build_plan


def _fingerprint_or_missing(path: str) -> str:
    return fingerprint(path) if Path(path).exists() else "missing"


def describe(plan: Plan, ordered: list[Stage], out: Path | None = None) -> str:
    """The DAG as text: one line per stage with its inputs, estimated cost and whether it is done."""
    from vlsafe.progress import clock

    lines, total = [], 0.0
    width = max(len(s.name) for s in ordered)
    for stage in ordered:
        state = ""
        if out is not None:
            state = "done" if finished(out, stage) else "todo"
            if state == "todo":
                total += stage.cost_s
        else:
            total += stage.cost_s
        inputs = ", ".join(stage.inputs) or "-"
        lines.append(f"  {stage.name:<{width}}  {stage.kind:<12} {clock(stage.cost_s):>8}  {state:<4}  <- {inputs}")
    scaled = f"; {plan.cost_note}" if plan.cost_note else ""
    lines.append(f"  {len(ordered)} stages; estimated {clock(total)} to run (cost model: vlsafe/study/dag.py{scaled})")
    return "\n".join(lines)


# the stages whose arithmetic is fp32 on a machine that trains in bf16: generation (evaluation when `eval.dtype`
# resolves to fp32, the data builders' own answers, the legibility probe) and the layer analysis's forward passes
FP32_KINDS = ("eval", "align-data", "pairs", "legibility", "analysis")


def machine_scale(config: StudyConfig) -> tuple[float, float, str]:
    """(factor, fp32 factor, note): the reference matmul peak of this machine's cost constants (plan.machine_costs:
    the bf16 set, or the fp32 set on a CPU without native bf16) over this machine's peak in the same precision; the
    fp32 factor, for FP32_KINDS, is the bf16 set's `reference_fp32_flops` over this machine's fp32 peak (the factor
    itself without that reference or on the fp32 set); (1.0, 1.0, "") without a reference or on a GPU, whose speed
    the profile's constants do not describe. On a CPU with AMX single bf16 readings swing 550-3100 GFLOP/s while
    fp32 ones stay within 320-400, and evaluation in fp32 is most of a study's time."""
    import torch

    from vlsafe.study.plan import machine_costs

    _, reference, measured_in, _ = machine_costs(config)
    if reference is None or torch.cuda.is_available():
        return 1.0, 1.0, ""
    from vlsafe.bench.limits import matmul_peak
    from vlsafe.precision import resolve, torch_dtype

    name = resolve("auto", "cpu")  # the bf16 set on a CPU without native bf16 (no fp32 set): its fp32 peak
    peak = matmul_peak(torch_dtype(name), 2048, 2.0)  # best of several: one 2048 fp32 matmul takes 0.2-0.4 s
    factor = reference / peak
    note = (f"scaled x{factor:.2f} to this machine: {name} matmul {peak / 1e9:.0f} GFLOP/s against the "
            f"profile's {measured_in} reference {reference / 1e9:.0f}")
    fp32_reference = config.cost.reference_fp32_flops if measured_in == "bf16" and name == "bf16" else None
    if fp32_reference is None:
        return factor, factor, note
    fp32_peak = matmul_peak(torch.float32, 2048, 2.0)
    fp32_factor = fp32_reference / fp32_peak
    return factor, fp32_factor, (f"{note}; its fp32 stages x{fp32_factor:.2f}: fp32 matmul {fp32_peak / 1e9:.0f} "
                                 f"GFLOP/s against {fp32_reference / 1e9:.0f}")


def model_scale(config: StudyConfig) -> tuple[float, str]:
    """(factor, note): the study's LLM's parameters per token over those of the LLM its cost constants were measured
    with (`cost.reference_params`, per set), as a token's FLOPs scale; (1.0, "") where either is unknown."""
    from vlsafe.model.llms import llm_params
    from vlsafe.study.plan import machine_costs

    reference = machine_costs(config)[3]
    params = llm_params(config.llm) if reference is not None else None
    if params is None:
        return 1.0, ""
    factor = params / reference
    if abs(factor - 1) < 0.01:
        return 1.0, ""
    return factor, (f"x{factor:.2f} for {config.llm}'s {params / 1e6:.0f}M parameters per token against the "
                    f"{reference / 1e6:.0f}M its constants were measured with")


def prepare(config_path: str | Path | None, profile: str | None) -> tuple[StudyConfig, Plan, list[Stage], Path]:
    from vlsafe import precision

    config, source = load_study(config_path, profile)
    plan = build_plan(config, str(source))
    eval_dtype = "fp32"
    try:  # a precision this machine cannot run fails before any work, not after hours of training
        eval_dtype = precision.resolve(config.eval.dtype, precision.device_type())
    except VlsafeError as err:
        plan.unrunnable.append(f"eval.dtype: {err}")
    ordered = plan.dag.assign_keys(_fingerprint_or_missing)
    (by_machine, fp32_machine, on_machine), (by_model, on_model) = machine_scale(config), model_scale(config)
    plan.cost_note = "; ".join(n for n in (on_machine, on_model) if n)
    for stage in ordered:
        in_fp32 = stage.kind in FP32_KINDS and (stage.kind != "eval" or eval_dtype == "fp32")
        stage.cost_s *= (fp32_machine if in_fp32 else by_machine) * by_model
    return config, plan, ordered, source


def _problems(plan: Plan) -> list[str]:
    return [f"missing input: {line}" for line in plan.missing] + [f"cannot run here: {line}"
                                                                   for line in plan.unrunnable]


def run_study(config_path: str | Path | None = None, profile: str | None = None, out: str | Path = "runs/study",
              dry_run: bool = False, log: Callable[[str], Any] = print, show_progress: bool = True) -> dict:
    """Runs (or resumes) the study into OUT and writes its report; returns the summary results.json (dry run:
    the plan)."""
    import yaml

    from vlsafe.io import write_json
    from vlsafe.assets import quiet_transformers
    from vlsafe.study.progress import StudyProgress
    from vlsafe.study.stages import Context, runner

    out = Path(out)
    config, plan, ordered, source = prepare(config_path, profile)
    if dry_run:
        log(f"study {config.name!r} from {source}: {len(ordered)} stages")
        log(describe(plan, ordered, out if out.is_dir() else None))
        if plan.missing or plan.unrunnable:
            raise VlsafeError.lines(_problems(plan))
        return {"stages": [s.name for s in ordered], "estimated_seconds": sum(s.cost_s for s in ordered)}
    if plan.missing or plan.unrunnable:
        raise VlsafeError.lines(_problems(plan))
    with Lock(out):
        (out / "study.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        write_json(out / "plan.json", {"config": str(source), "stages": [
            {"name": s.name, "kind": s.kind, "inputs": s.inputs, "key": s.key, "estimated_seconds": round(s.cost_s, 1),
             "command": s.command} for s in ordered], "models": plan.models})
        (out / "failed.json").unlink(missing_ok=True)
        ctx = Context(out, log=log, show_progress=show_progress)
        progress = StudyProgress(ordered, quiet=not show_progress)
        skipped = 0
        with quiet_transformers():
            for stage in ordered:
                record = finished(out, stage)
                if record is not None:
                    ctx.records[stage.name] = record
                    progress.skip(stage)
                    skipped += 1
                    continue
                progress.start(stage)
                record = run_stage(out, stage, runner(ctx, stage.kind, stage.config))
                ctx.records[stage.name] = record
                progress.finish(stage, record["seconds"])
        progress.summary(skipped)
        from vlsafe.report.build import build_report

        summary = build_report(out)
    summary["reused_stages"] = skipped
    return summary


def load_records(out: Path) -> dict[str, dict]:
    """stage.json of every finished stage of a study folder (partial runs included)."""
    records = {}
    for path in sorted((out / "stages").glob("*/stage.json")):
        try:
            records[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    return records
