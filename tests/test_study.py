"""`vlsafe study` on pico models: the whole DAG runs, reruns reuse every finished stage, a kill resumes to the same
results, bad configs and missing inputs fail before any work, a second run on one folder is refused, and the claims'
verdict logic holds on constructed outcomes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from killharness import PICO_STUDY, SEEDS, campaign, study_case, study_reference
from vlsafe.cli import main
from vlsafe.errors import VlsafeError
from vlsafe.study import claims
from vlsafe.study.dag import Dag, Lock, Stage
from vlsafe.study.run import run_study

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, name: str, **over) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"extends": "pico", **over}))
    return path


def _stage_files(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}


@pytest.fixture(scope="module")
def pico_study(tmp_path_factory):
    """This module's copy of the session's uninterrupted pico study (`vlsafe study --profile pico`), which
    tests/test_kill.py also compares killed runs against; tests here may add stages to the copy."""
    out = tmp_path_factory.mktemp("study") / "pico"
    shutil.copytree(study_reference(tmp_path_factory), out)
    return out, json.loads((out / "results.json").read_text())


def test_whole_dag_runs_on_pico_and_reports_every_model_and_claim(pico_study):
    out, results = pico_study
    plan = json.loads((out / "plan.json").read_text())
    assert results["complete"] and len(_stage_files(out)) == len(plan["stages"])
    assert [c["id"] for c in results["claims"]] == ["F1", "F2", "F3", "F4"]
    assert all(c["verdict"] in ("reproduced", "not_reproduced", "inconclusive") and c["reason"]
               for c in results["claims"])
    f3 = results["claims"][2]
    # F3 is read from the study's own layer analysis: per-layer change of the adapted model and the cosine
    assert "no layer analysis" not in f3["reason"] and f3["top_layers"] and "layer_ratio" in f3
    assert "analysis" in _stage_files(out) and any(s.startswith("merge-") and "resta" in s for s in _stage_files(out))
    models = {m["model"] for m in results["models"]}
    assert {"llm", "aligned", "vlm1", "adapted-s0", "adapted-s0-step2", "control-s0", "safety_sft-s0", "mixed-s0",
            "dpo-s0", "merge-linear-aligned-0.5-s0", "merge-linear-safety_sft-0.5-s0"} <= models
    # the control arm is the aligned LLM fine-tuned on text only: a text model, evaluated on the text condition
    control = next(m for m in results["models"] if m["model"] == "control-s0")
    assert {c["condition"] for c in control["cells"]} == {"text"}
    # safety dynamics along stage 2: VLM@1 (step 0), the checkpoint at step 2, the adapted model (step 4)
    curve = results["dynamics"]["s0"]["attack_success_rate"]["text"]
    assert [p["step"] for p in curve] == [0, 2, 4] and all(p["n"] == 4 for p in curve)
    # held-out image questions per type, each beside the chance of guessing among its answer choices
    held = results["heldout"]
    assert set(held["chance"]) == {"colour", "shape", "count", "position", "ocr", "digit"}
    assert 0 < held["chance"]["shape"] < 1 and held["models"]["adapted-s0"]["*"]["n"] == 4
    # the pico tower cannot read: the probe says so, and F1 leaves the typographic condition out
    assert results["typo_perceived"] is False
    typo = next(c for c in results["claims"][0]["comparisons"] if c["condition"] == "typo")
    assert typo["status"] == "not_perceived"
    # lineage: every stage with its key and command; trained and merged models with their content hash
    lineage = {r["stage"]: r for r in results["lineage"]}
    assert lineage["stage2-s0"]["model_sha256"] and lineage["stage2-s0"]["inputs"] == ["stage1", "corpus"]
    assert lineage["eval-adapted-s0"]["judges"][0]["name"] == "refusal-patterns"
    # every evaluation generates in the profile's eval precision (fp32 unless asked), and its command says so
    evaluated = json.loads((out / "stages" / "eval-adapted-s0" / "eval" / "results.json").read_text())
    assert evaluated["decoding"]["dtype"] == "fp32" and "--dtype fp32" in lineage["eval-adapted-s0"]["command"]
    assert results["eval_dtypes"] == ["fp32"]
    record = json.loads((out / "stages" / "stage2-s0" / "stage.json").read_text())
    assert {"key", "inputs", "config", "command", "seconds", "versions"} <= set(record)
    # every wall time names the machine that took it: one machine here, with every stage and their summed seconds
    assert record["machine"]["cpu"] and record["machine"]["threads"] >= 1
    (ran,) = results["machines"]
    assert ran["stages"] == len(plan["stages"]) and record["machine"]["cpu"] in ran["machine"]
    assert ran["seconds"] == pytest.approx(sum(results["seconds_by_stage"].values()), abs=0.05)
    # ... and where they went, by stage kind
    train_seconds = sum(r["seconds"] for r in results["lineage"] if r["kind"] == "train")
    assert train_seconds > 0 and ran["by_kind"]["train"] == pytest.approx(train_seconds, abs=0.05)
    assert ran["seconds"] == pytest.approx(sum(ran["by_kind"].values()), abs=0.05)
    from vlsafe.report.markdown import ran_on

    assert f"Ran on: {ran_on(results['machines'])}; evaluated in fp32." in (out / "report.md").read_text()
    assert ran_on([{"machine": "CPU", "stages": 4, "seconds": 2130.0,
                    "by_kind": {"train": 1200.0, "eval": 900.0, "corpus": 20.0, "merge": 10.0}}]) == \
        "CPU (4 stages, 35.5 min: train 20.0, eval 15.0, other 0.5)"
    assert ran_on([{"machine": "CPU", "stages": 2, "seconds": 121.0, "by_kind": {"train": 120.0, "merge": 1.0}}]) == \
        "CPU (2 stages, 2.0 min: train 2.0)"  # a second's rest is not shown as "other 0.0"
    assert ran_on([{"machine": "CPU", "stages": 2, "seconds": 121.0, "by_kind": {"train": 120.0, "eval": 1.0}}],
                  ["eval-llm"]) == "CPU (2 stages, 2.0 min: train 2.0); 1 evaluation took every answer from the " \
                                   "cache, so its time is judging only"
    assert f"Ran on: {ran['machine']}" in (out / "report.md").read_text()
    # a finished training stage keeps its checkpoints' models (evaluated) but not their resume state
    step = out / "stages" / "stage2-s0" / "run" / "checkpoints" / "step-2"
    assert (step / "model.safetensors").is_file() and not (step / "training_state").exists()


def test_rerun_reuses_every_stage_and_a_changed_setting_recomputes_only_its_dependants(pico_study, tmp_path):
    out, first = pico_study
    before = _stage_files(out)
    again = run_study(None, "pico", out, log=lambda m: None, show_progress=False)
    assert again["reused_stages"] == len(before) and _stage_files(out) == before
    assert json.loads((out / "results.json").read_text())["claims"] == first["claims"]
    # a new merge weight: the two merges and their evals run, nothing upstream does
    changed = _config(tmp_path, "weights", merges={"methods": ["linear"], "weights": [0.25], "partners": ["aligned"]})
    result = run_study(changed, None, out, log=lambda m: None, show_progress=False)
    after = _stage_files(out)
    rerun = {name for name in after if after[name] != before.get(name)}
    assert rerun == {"merge-linear-aligned-0.25-s0", "eval-merge-linear-aligned-0.25-s0"}
    assert result["reused_stages"] == len(json.loads((out / "plan.json").read_text())["stages"]) - 2
    assert result["answers_from_cache"] == []  # every evaluation so far generated its answers


def test_a_new_eval_version_rescores_every_model_from_the_cache(pico_study, tmp_path, monkeypatch):
    from vlsafe.study import dag

    out, first = pico_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    monkeypatch.setitem(dag.KIND_VERSIONS, "eval", dag.KIND_VERSIONS.get("eval", 0) + 1)
    result = run_study(None, "pico", copy, log=lambda m: None, show_progress=False)
    evals = sorted(s["name"] for s in json.loads((copy / "plan.json").read_text())["stages"]
                   if s["name"].startswith("eval-"))
    assert evals and result["reused_stages"] == len(json.loads((copy / "plan.json").read_text())["stages"]) - len(evals)
    ran = [n for n in evals if "eval" in json.loads((copy / "stages" / n / "stage.json").read_text())["outputs"]]
    assert result["answers_from_cache"] == ran  # re-scored, nothing generated: their seconds are not a first run's
    assert result["claims"] == first["claims"]


def test_kill_then_the_same_command_resumes_to_the_same_results(pico_study, tmp_path):
    """SIGKILL during stage 2 (after its first checkpoint), then the same command: the adapted model and its
    evaluation equal the uninterrupted run's, stage for stage."""
    reference, _ = pico_study
    config = _config(tmp_path, "small", arms=[], merges=None)
    out = tmp_path / "killed"
    # the stages before stage 2 are the reference run's (same keys: reused), so the kill lands in stage 2 quickly
    for stage in ("corpus", "align-data", "align", "vlm0", "stage1", "suite", "eval-llm", "eval-aligned", "eval-vlm1"):
        shutil.copytree(reference / "stages" / stage, out / "stages" / stage)
    command = [sys.executable, "-m", "vlsafe.cli", "study", str(config), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "stages" / "stage2-s0" / "run" / "checkpoints" / "step-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "results.json").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("stage2-s0", "eval-adapted-s0", "eval-adapted-s0-step2"):
        ours = json.loads((out / "stages" / stage / "stage.json").read_text())
        theirs = json.loads((reference / "stages" / stage / "stage.json").read_text())
        assert ours["key"] == theirs["key"]
    weights = lambda root: json.loads((root / "stages/stage2-s0/run/final/vlsafe.json").read_text())["content_sha256"]
    assert weights(out) == weights(reference)
    def answers(root):  # what was asked, answered and judged (image paths name each run's own folder)
        lines = (root / "stages/eval-adapted-s0/eval/samples.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line]
        return [(r["benchmark"], r["condition"], r["id"], r["response"], r["verdicts"]) for r in rows]

    assert answers(out) == answers(reference)


def test_two_seeds_pool_in_every_claim_and_the_report_shows_their_spread(tmp_path_factory, tmp_path):
    """seeds: [0, 1] on a copy of the one-seed run (arms cut to what F1 and F2 read, to stay small): only seed 1's
    stages run; F1 and F2 pair both seeds' items (n items in each seed, pairs = items x seeds) and give each seed's
    difference beside the pooled interval."""
    reference = study_reference(tmp_path_factory)
    out = tmp_path / "two"
    shutil.copytree(reference / "stages", out / "stages")
    config = _config(tmp_path, "two", seeds=[0, 1], arms=["control", "safety_sft"], merges=None, analysis=False)
    results = run_study(config, None, out, log=lambda m: None, show_progress=False)
    planned = [s["name"] for s in json.loads((out / "plan.json").read_text())["stages"]]
    assert results["reused_stages"] == len([name for name in planned if "-s1" not in name])  # seed 0: all reused
    assert {"adapted-s1", "control-s1", "safety_sft-s1"} <= {m["model"] for m in results["models"]}
    f1, f2 = results["claims"][:2]
    for claim in (f1, f2):
        assert claim["seeds"] == 2 and len(claim["per_seed"]) == 2 and claim["seed_sd"] is not None
        assert claim["pairs"] == 2 * claim["n"] and claim["n"] > 0
    text = next(c for c in f1["comparisons"] if c["compare"] == "adapted VLM vs aligned LLM")
    assert text["seeds"] == 2 and text["n"] == 4  # the 4 harmful text items, in each of the two seeds
    spread = results["seed_spread"]
    assert {"adapted", "control", "safety_sft"} <= set(spread)
    assert all(r["seeds"] == 2 and set(r["per_seed"]) == {"0", "1"} for r in spread["adapted"])
    report = (out / "report.md").read_text()
    assert "## Across seeds" in report and "seed spread" in report and "n=4 x 2 seeds" in report
    assert "Across seeds" in (out / "report.html").read_text()
    # held-out image accuracy per type: chance beside it, and the adapted VLM's mean ± sd over its two seeds
    held = results["heldout"]
    assert held["spread"]["adapted"]["*"]["seeds"] == 2 and "adapted (mean ± sd over seeds)" in report
    assert f"shape (chance {held['chance']['shape']:.0%})" in report


def test_claims_pair_seed_with_seed_and_broadcast_only_a_model_no_seed_trained():
    n = 40
    aligned = {None: _outcomes([False] * n)}
    adapted = {0: _outcomes([i < 20 for i in range(n)]), 1: _outcomes([i < 10 for i in range(n)])}
    estimate = claims.paired(aligned, adapted, claims.HARMFUL, ("text",))
    assert estimate["seeds"] == 2 and estimate["per_seed"] == [0.5, 0.25]  # one aligned LLM against both seeds
    # a partial run: the remedy exists for seed 1 only; it is compared with seed 1's adapted model, not seed 0's
    remedy = {1: _outcomes([i < 10 for i in range(n)])}
    only = claims.paired(adapted, remedy, claims.HARMFUL, ("text",))
    assert only["seeds"] == 1 and only["difference"] == 0.0
    assert claims.paired({0: adapted[0]}, remedy, claims.HARMFUL, ("text",))["reason"] == "no training seed in common"


def test_dry_run_prints_the_dag_and_names_every_missing_input(tmp_path, capsys):
    config = _config(tmp_path, "missing", llm=str(tmp_path / "no-such-llm"),
                     data={"stage2": {"path": str(tmp_path / "llava_instruct.json"), "format": "llava"}})
    assert main(["study", str(config), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "stage2-s0" in captured.out and "estimated" in captured.out
    errors = [line for line in captured.err.splitlines() if "missing input" in line]
    assert any("no-such-llm" in line for line in errors) and any("llava_instruct.json" in line for line in errors)
    # the same config without --dry-run fails the same way before any work
    assert main(["study", str(config), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_auto_precision_is_made_concrete_in_each_training_stage(tmp_path, monkeypatch):
    """A stage's key and train.yaml say what it computes: a stage trained in bf16 is not reused where fp32 runs."""
    from vlsafe import precision
    from vlsafe.study.run import prepare

    config = _config(tmp_path, "auto", train={"defaults": {"dtype": "auto"}})
    keys = {}
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
        _, plan, ordered, _ = prepare(config, None)
        trains = [s for s in ordered if s.kind == "train"]
        assert trains and {s.config["train"]["dtype"] for s in trains} == {expected} and not plan.unrunnable
        keys[expected] = {s.name: s.key for s in trains}
    assert all(keys["bf16"][name] != keys["fp32"][name] for name in keys["fp32"])


def test_the_estimate_scales_to_this_machines_matmul_peak(tmp_path, monkeypatch):
    from vlsafe.bench import limits
    from vlsafe.study.run import prepare

    _, _, plain, _ = prepare(_config(tmp_path, "plain"), None)
    # a profile measured on a machine with twice this one's peak: every stage is estimated twice as long
    monkeypatch.setattr(limits, "matmul_peak", lambda dtype, size, seconds, device="cpu": 1e11)
    _, plan, scaled, _ = prepare(_config(tmp_path, "scaled", cost={"reference_bf16_flops": 2e11}), None)
    assert [s.name for s in scaled] == [s.name for s in plain] and [s.key for s in scaled] == [s.key for s in plain]
    assert all(b.cost_s == pytest.approx(2 * a.cost_s) for a, b in zip(plain, scaled))
    assert "scaled x2.00 to this machine" in plan.cost_note
    assert "100 GFLOP/s against the profile's bf16 reference 200" in plan.cost_note


def test_stages_that_compute_in_fp32_scale_by_the_fp32_peak(tmp_path, monkeypatch):
    """On a CPU that trains in bf16, evaluation in fp32, the data builders' answers and the analysis are estimated
    from the fp32 peaks (this machine's against the profile's `reference_fp32_flops`), training from the bf16 ones;
    an evaluation in bf16 follows training. No key changes."""
    from vlsafe import precision
    from vlsafe.bench import limits
    from vlsafe.study.run import FP32_KINDS, prepare

    import torch

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    peaks = {torch.float32: 5e10, torch.bfloat16: 4e11}
    monkeypatch.setattr(limits, "matmul_peak", lambda dtype, size, seconds, device="cpu": peaks[dtype])
    _, _, plain, _ = prepare(_config(tmp_path, "plain"), None)
    cost = {"reference_bf16_flops": 8e11, "reference_fp32_flops": 1.5e11}
    _, plan, scaled, _ = prepare(_config(tmp_path, "scaled", cost=cost), None)
    assert [s.key for s in scaled] == [s.key for s in plain]
    in_fp32 = {s.name for s in plain if s.kind in FP32_KINDS}
    assert {s.kind for s in plain if s.name in in_fp32 and s.cost_s > 0} >= {"eval", "analysis"}
    assert any(s.kind == "train" and s.cost_s > 0 for s in plain)
    for a, b in zip(plain, scaled):
        assert b.cost_s == pytest.approx((3 if a.name in in_fp32 else 2) * a.cost_s), a.name
    assert "its fp32 stages x3.00: fp32 matmul 50 GFLOP/s against 150" in plan.cost_note
    _, _, bf16_eval, _ = prepare(_config(tmp_path, "bf16-eval", cost=cost, eval={"dtype": "bf16"}), None)
    _, _, bf16_plain, _ = prepare(_config(tmp_path, "bf16-plain", eval={"dtype": "bf16"}), None)
    for a, b in zip(bf16_plain, bf16_eval):
        assert b.cost_s == pytest.approx((3 if a.kind in FP32_KINDS and a.kind != "eval" else 2) * a.cost_s), a.name


def test_the_estimate_scales_with_the_llms_parameters_per_token(tmp_path, monkeypatch):
    """A config naming an LLM three times the size of the one its cost constants were measured with is estimated
    three times as long (FLOPs per token); an LLM of unknown size keeps the estimate as it is. No key changes."""
    from vlsafe.model import llms
    from vlsafe.study.run import prepare

    _, _, plain, _ = prepare(_config(tmp_path, "plain"), None)
    monkeypatch.setattr(llms, "llm_params", lambda spec: 3_000_000 if spec == "pico" else None)
    _, plan, scaled, _ = prepare(_config(tmp_path, "big", cost={"reference_params": 1e6}), None)
    assert [s.key for s in scaled] == [s.key for s in plain]
    assert all(b.cost_s == pytest.approx(3 * a.cost_s) for a, b in zip(plain, scaled))
    assert "x3.00 for pico's 3M parameters per token against the 1M its constants were measured with" in plan.cost_note
    monkeypatch.setattr(llms, "llm_params", lambda spec: None)
    _, plan, unknown, _ = prepare(_config(tmp_path, "unknown", cost={"reference_params": 1e6}), None)
    assert [s.cost_s for s in unknown] == [s.cost_s for s in plain] and "parameters" not in plan.cost_note


def test_a_cpu_without_native_bf16_is_estimated_from_the_profiles_fp32_constants(tmp_path, monkeypatch):
    """Where training runs in fp32, the estimate takes the constants measured on such a CPU and scales them by
    fp32 peaks; a CPU with native bf16 keeps the bf16 constants and peaks. Neither changes a stage's key."""
    from vlsafe import precision
    from vlsafe.bench import limits
    from vlsafe.study.run import prepare

    import torch

    peaks = {torch.float32: 5e10, torch.bfloat16: 4e11}
    monkeypatch.setattr(limits, "matmul_peak", lambda dtype, size, seconds, device="cpu": peaks[dtype])
    fp32 = {"train_token_s": 4e-5, "projector_token_s": 3e-5, "generate_token_s": 5e-3, "reference_fp32_flops": 1e11}
    config = _config(tmp_path, "costs", cost={"reference_bf16_flops": 8e11, "fixed_s": 0.0, "fp32": fp32})
    estimates = {}
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
        _, plan, ordered, _ = prepare(config, None)
        estimates[native] = {s.name: s.cost_s for s in ordered}
        assert "scaled x2.00 to this machine" in plan.cost_note
        assert ("fp32 matmul 50 GFLOP/s against the profile's fp32 reference 100" if not native else
                "bf16 matmul 400 GFLOP/s against the profile's bf16 reference 800") in plan.cost_note
    bf16, fp32_run = estimates[True], estimates[False]
    # pico's constants: train 1e-5, projector 1e-5, generate 1e-3 (each x2 by its peak ratio on both machines)
    assert fp32_run["align"] == pytest.approx(4 * bf16["align"])
    assert fp32_run["stage1"] == pytest.approx(3 * bf16["stage1"])
    assert fp32_run["eval-aligned"] == pytest.approx(5 * bf16["eval-aligned"]) and bf16["eval-aligned"] > 0
    assert fp32_run["merge-linear-aligned-0.5-s0"] == bf16["merge-linear-aligned-0.5-s0"]


def test_the_eta_follows_measured_time_without_one_short_stage_rescaling_the_rest():
    from types import SimpleNamespace

    from vlsafe.study.progress import StudyProgress

    stages = [SimpleNamespace(name=f"s{i}", cost_s=c) for i, c in enumerate([40.0, 3600.0, 3600.0, 3600.0])]
    progress = StudyProgress(stages, quiet=True)
    assert progress._eta() == pytest.approx(10840.0)
    progress.finish(stages[0], 10.0)  # a short stage 4x faster than its estimate
    assert 0.9 * 10800 < progress._eta() < 10800
    progress.finish(stages[1], 7200.0)  # a long one twice its estimate: the rest follows it
    assert 1.8 * 7200 < progress._eta() < 2.0 * 7200


def test_bad_configs_fail_before_any_work_with_one_line(tmp_path, capsys):
    bad_partner = _config(tmp_path, "partner", merges={"partners": ["nonesuch"]})
    assert main(["study", str(bad_partner), "--out", str(tmp_path / "a")]) == 2
    assert "merges.partners" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["study", "--profile", "nonesuch", "--out", str(tmp_path / "b")]) == 2
    assert "unknown study profile 'nonesuch'" in capsys.readouterr().err
    bad_train = _config(tmp_path, "train", train={"stage9": {"lr": 1}})
    assert main(["study", str(bad_train), "--out", str(tmp_path / "c")]) == 2
    assert "train.stage9: unknown stage" in capsys.readouterr().err
    bad_layer = _config(tmp_path, "layer", tower_feature_layer=7)  # the pico tower has 3 maps
    assert main(["study", str(bad_layer), "--out", str(tmp_path / "d")]) == 2
    assert "tower_feature_layer: pico: feature layer 7 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    bad_cost = _config(tmp_path, "cost", cost={"fp32": {"train_token_s": -1.0}})
    assert main(["study", str(bad_cost), "--out", str(tmp_path / "g"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad_cost}: field 'cost.fp32.train_token_s': Input should be greater than 0"]
    bad_size = _config(tmp_path, "size", cost={"reference_params": "many"})
    assert main(["study", str(bad_size), "--out", str(tmp_path / "h"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {bad_size}: field 'cost.reference_params': Input should be a valid number, unable to parse string "
        "as a number"] and not (tmp_path / "h").exists()
    from vlsafe import precision

    with pytest.MonkeyPatch.context() as patch:  # a CPU without bf16 instructions
        patch.setattr(precision, "cpu_has_bf16", lambda: False)
        bf16 = _config(tmp_path, "bf16", eval={"dtype": "bf16"})
        assert main(["study", str(bf16), "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "eval.dtype: dtype bf16" in err[0] and not (tmp_path / "e").exists()
        # a training precision too, dry run or not, and one line per stage that asks for it (not per seed)
        bf16 = _config(tmp_path, "train-bf16", seeds=[0, 1], train={"defaults": {"dtype": "bf16"}})
        assert main(["study", str(bf16), "--out", str(tmp_path / "f"), "--dry-run"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "cannot run here" in line]
        assert any("train.stage1.dtype: dtype bf16" in line for line in err) and len(err) == len(set(err))
        assert main(["study", str(bf16), "--out", str(tmp_path / "f")]) == 2 and not (tmp_path / "f").exists()
    dag = Dag()
    dag.add(Stage("a", "merge", {}, inputs=["b"]))
    dag.add(Stage("b", "merge", {}, inputs=["a"]))
    with pytest.raises(VlsafeError, match="cycle: a -> b -> a"):
        dag.order()
    dag.add(Stage("c", "eval", {}, inputs=["nowhere"]))
    with pytest.raises(VlsafeError, match="'nowhere'"):
        Dag({"c": dag.stages["c"]}).order()


def test_a_second_study_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "locked"
    with Lock(out):
        assert main(["study", "--profile", "pico", "--out", str(out)]) == 2
    assert "another study is running on this folder" in capsys.readouterr().err
    assert not (out / "stages").exists()


def test_a_failing_stage_is_named_and_finished_stages_stay(tmp_path, capsys):
    broken = tmp_path / "align.jsonl"
    broken.write_text("{not json\n")
    config = _config(tmp_path, "broken", data={"align": {"path": str(broken), "format": "jsonl"}})
    out = tmp_path / "out"
    assert main(["study", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stage 'align' failed" in err and "run the same command again" in err
    assert (out / "stages" / "corpus" / "stage.json").is_file()
    assert json.loads((out / "failed.json").read_text())["stage"] == "align"


def test_a_stage_with_an_accelerate_config_runs_through_accelerate_launch(pico_study, tmp_path):
    from vlsafe.study.stages import Context, run_train

    reference, _ = pico_study
    ctx = Context(tmp_path)
    for name in ("vlm0", "corpus"):  # the reference run's outputs, as absolute paths
        record = json.loads((reference / "stages" / name / "stage.json").read_text())
        ctx.records[name] = {**record, "outputs": {k: str(reference / v) for k, v in record["outputs"].items()
                                                   if isinstance(v, str)}}
    folder = tmp_path / "stage1-ddp"
    folder.mkdir()
    train = {"stage": "projector", "model": "@vlm0:model",
             "data": [{"path": "@corpus:corpus/stage1_captions.json", "format": "llava"}], "lr": 1e-3,
             "batch_size": 2, "max_steps": 1, "max_length": 128, "warmup_ratio": 0.0,
             "accelerate": str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")}
    outputs = run_train(ctx, {"train": train}, folder)
    run_config = yaml.safe_load((folder / "run" / "config.yaml").read_text())
    assert run_config["provenance"]["processes"] == 2
    assert (tmp_path / outputs["model"] / "vlsafe.json").is_file() and outputs["model"] == "stage1-ddp/run/final"


# ------------------------------------------------------------------------------------ claims on constructed data
def _outcomes(attack: list[bool], refusal: list[bool] = (), correct: list[bool] = (), condition: str = "text",
              extra: dict | None = None) -> dict:
    out = {("harmbench", condition, str(i)): {"metric": claims.HARMFUL, "attack": a, "refusal": not a,
                                              "non_answer": False, "correct": False} for i, a in enumerate(attack)}
    out |= {("overrefusal", "text", str(i)): {"metric": claims.OVERREFUSAL, "attack": False, "refusal": r,
                                              "non_answer": False, "correct": False} for i, r in enumerate(refusal)}
    out |= {("text_helpfulness", "text", str(i)): {"metric": claims.HELPFUL, "attack": False, "refusal": False,
                                                   "non_answer": False, "correct": c} for i, c in enumerate(correct)}
    return out | (extra or {})


def test_f1_verdicts_follow_the_paired_interval():
    n = 80
    aligned = [_outcomes([i < 4 for i in range(n)])]
    eroded = [_outcomes([i < 30 for i in range(n)]), _outcomes([i < 28 for i in range(n)])]  # two seeds
    same = [_outcomes([i < 4 for i in range(n)])]
    noisy = [_outcomes([i in (2, 3, 7, 14, 21, 28, 35, 42, 49, 56) for i in range(n)])]  # +8 and -2: +7.5 points
    f1 = claims.f1({"aligned": aligned, "adapted": eroded}, perceived=True, margin=0.05)
    assert f1["verdict"] == "reproduced" and f1["seeds"] == 2 and f1["ci"][0] > 0 and f1["n"] == n
    assert claims.f1({"aligned": aligned, "adapted": same}, True, 0.05)["verdict"] == "not_reproduced"
    assert claims.f1({"aligned": aligned, "adapted": noisy}, True, 0.05)["verdict"] == "inconclusive"
    assert claims.f1({"aligned": aligned}, True, 0.05)["verdict"] == "inconclusive"
    # no change on a small sample is not evidence of no effect (rule of three: 3/n >= margin)
    few = [_outcomes([False] * 20)]
    assert claims.f1({"aligned": few, "adapted": few}, True, 0.05)["verdict"] == "inconclusive"
    # the control arm eroded as much: the reason says the erosion is not specific to VL adaptation
    both = claims.f1({"aligned": aligned, "adapted": eroded, "control": eroded[:1]}, True, 0.05)
    assert "not specific to VL" in both["reason"] or "not told apart" in both["reason"]


def test_f1_gives_each_perceived_condition_a_verdict_and_splits_the_image_effect_at_vlm1():
    n = 80
    harmful = [i < 4 for i in range(n)]
    aligned = [_outcomes(harmful)]  # text only: an LLM sees no image
    vlm1 = {None: _outcomes(harmful, extra=_outcomes([i < 16 for i in range(n)], condition="blank"))}
    unseen = _outcomes([i < 40 for i in range(n)], condition="typo")  # the typographic condition, not perceived
    text_same = {0: _outcomes(harmful, extra=_outcomes([i < 36 for i in range(n)], condition="blank") | unseen)}
    result = claims.f1({"aligned": aligned, "adapted": text_same, "vlm1": vlm1}, perceived=False, margin=0.05)
    # as text nothing changed, with a blank image ASR rose: the two disagree, so F1 as a whole is inconclusive
    assert result["conditions"]["text"]["verdict"] == "not_reproduced"
    assert result["conditions"]["blank"]["verdict"] == "reproduced" and "typo" not in result["conditions"]
    assert result["verdict"] == "inconclusive"
    steps = {r["compare"]: r for r in result["comparisons"] if r["condition"] == "blank"}
    assert steps["VLM@1 (image) vs aligned LLM (same request as text)"]["difference"] == pytest.approx(0.15)
    assert steps["adapted VLM vs VLM@1 (same image)"]["difference"] == pytest.approx(0.25)
    assert "then stage 2 (adapted - VLM@1: +25.0 pts" in result["reason"]
    # as text too small a sample to rule anything out, with a blank image a clear rise: reproduced, on the image
    noisy = [i in (2, 3, 7, 14, 21, 28, 35, 42, 49, 56) for i in range(n)]
    text_noisy = {0: _outcomes(noisy, extra=_outcomes([i < 36 for i in range(n)], condition="blank"))}
    result = claims.f1({"aligned": aligned, "adapted": text_noisy}, perceived=False, margin=0.05)
    assert result["verdict"] == "reproduced" and result["estimate"] == pytest.approx(0.4)
    assert result["conditions"]["text"]["verdict"] == "inconclusive"
    assert not any("VLM@1" in r["compare"] for r in result["comparisons"])  # no VLM@1 evaluated: no split


def test_f2_needs_lower_asr_and_a_cost():
    n = 80
    adapted = [_outcomes([True] * n, [i < 2 for i in range(n)], [True] * n)]
    costly = [_outcomes([i < 3 for i in range(n)], [i < 25 for i in range(n)], [True] * n)]
    free = [_outcomes([i < 3 for i in range(n)], [i < 2 for i in range(n)], [True] * n)]
    useless = [_outcomes([True] * n, [i < 2 for i in range(n)], [True] * n)]
    assert claims.f2({"adapted": adapted, "safety_sft": costly}, True, 0.05)["verdict"] == "reproduced"
    assert claims.f2({"adapted": adapted, "safety_sft": free}, True, 0.05)["verdict"] == "not_reproduced"
    assert claims.f2({"adapted": adapted, "dpo": useless}, True, 0.05)["verdict"] == "not_reproduced"
    assert claims.f2({"adapted": adapted}, True, 0.05)["verdict"] == "inconclusive"


def test_f3_reads_the_layer_analysis():
    assert claims.f3(None)["verdict"] == "inconclusive"
    rows = [{"model": "adapted-s0", "layer": layer, "module": "mlp", "relative_change": change}
            for layer, change in enumerate([0.01, 0.01, 0.2, 0.01])]
    apart = {"weights": rows, "task_vectors": [{"cosine": -0.2, "sign_conflict_rate": 0.6}]}
    assert claims.f3(apart)["verdict"] == "reproduced" and claims.f3(apart)["top_layers"][0] == 2
    flat = {"weights": [{**r, "relative_change": 0.01} for r in rows], "task_vectors": [{"cosine": 0.3}]}
    assert claims.f3(flat)["verdict"] == "not_reproduced"


def test_f4_a_merge_that_dominates_a_remedy_with_paired_support():
    n = 40
    sft = [_outcomes([i < 4 for i in range(n)], [i < 30 for i in range(n)], [i < 20 for i in range(n)])]
    merge = [_outcomes([i < 4 for i in range(n)], [i < 4 for i in range(n)], [i < 20 for i in range(n)])]
    worse = [_outcomes([i < 30 for i in range(n)], [i < 35 for i in range(n)], [i < 10 for i in range(n)])]
    f4 = claims.f4({"safety_sft": sft, "merge-linear-x-0.5": merge}, True, 0.05)
    assert f4["verdict"] == "reproduced" and f4["merge"] == "merge-linear-x-0.5" and f4["ci"][1] < 0
    assert claims.f4({"safety_sft": sft, "merge-linear-x-0.5": worse}, True, 0.05)["verdict"] == "not_reproduced"
    assert claims.f4({"safety_sft": sft}, True, 0.05)["verdict"] == "inconclusive"


def test_item_outcomes_use_the_three_way_verdict_when_present():
    rows = [{"benchmark": "harmbench", "condition": "text", "id": 1, "metric": claims.HARMFUL,
             "verdicts": {"j": {"refused": False, "verdict": "non_answer"}}},
            {"benchmark": "harmbench", "condition": "text", "id": 2, "metric": claims.HARMFUL,
             "verdicts": {"j": {"refused": False}}}]
    found = claims.item_outcomes(rows, "j")
    assert found["harmbench", "text", "1"]["attack"] is False and found["harmbench", "text", "1"]["non_answer"]
    assert found["harmbench", "text", "2"]["attack"] is True


def test_a_kind_version_bump_rekeys_that_kind_and_what_reads_it_only(tmp_path, monkeypatch):
    from vlsafe.study import dag
    from vlsafe.study.config import load_study
    from vlsafe.study.plan import build_plan

    def keys():
        plan = build_plan(load_study(_config(tmp_path, "versions"))[0])
        return {s.name: (s.kind, s.key) for s in plan.dag.assign_keys(lambda f: "same")}

    before = keys()
    monkeypatch.setitem(dag.KIND_VERSIONS, "legibility", dag.KIND_VERSIONS.get("legibility", 0) + 1)
    after = keys()
    changed = {name for name in before if before[name] != after[name]}
    assert changed and {before[n][0] for n in changed} == {"legibility"}  # nothing reads the probe but the report
    monkeypatch.setitem(dag.KIND_VERSIONS, "train", dag.KIND_VERSIONS.get("train", 0) + 1)
    retrained = {name for name in before if before[name] != keys()[name]}
    assert {before[n][0] for n in retrained} >= {"train", "eval", "merge"}  # every model and what reads it


def test_analysis_switch_adds_the_layer_analysis_and_the_merges_it_proposes(tmp_path):
    from vlsafe.study.config import load_study
    from vlsafe.study.plan import build_plan

    config, _ = load_study(_config(tmp_path, "analysis", analysis=True))
    plan = build_plan(config)
    analysis = plan.dag.stages["analysis"]
    assert analysis.config["names"] == ["vlm1", "adapted", "sft", "dpo"]
    assert analysis.config["pairs"] == [["adapted-vlm1", "sft-adapted"], ["adapted-vlm1", "dpo-adapted"]]
    for builder in ("safety_layers", "gated", "resta", "expo"):
        assert "analysis" in plan.dag.stages[f"merge-{builder}-s0"].inputs
        assert f"eval-merge-{builder}-s0" in plan.dag.stages
    # RESTA reads the unaligned base LLM as weights: a stage saves it first
    assert plan.dag.stages["merge-resta-s0"].config["args"]["unaligned"] == "@llm:model"
    assert plan.dag.order()  # no cycle, every input defined


def test_checkpoint_evals_of_the_first_seed_only(tmp_path):
    from vlsafe.study.config import load_study
    from vlsafe.study.plan import build_plan

    every = build_plan(load_study(_config(tmp_path, "every", seeds=[0, 1]))[0])
    first = build_plan(load_study(_config(tmp_path, "first", seeds=[0, 1], eval={"checkpoints": "first_seed"}))[0])
    steps = lambda plan, seed: sorted(n for n in plan.dag.stages if n.startswith(f"eval-adapted-s{seed}-step"))  # noqa: E731
    assert steps(every, 0) and steps(every, 1) and steps(first, 0) == steps(every, 0)
    assert steps(first, 1) == [] and "eval-adapted-s1" in first.dag.stages  # seed 1's final model is still measured


def test_a_tower_feature_layer_rekeys_the_vlm_and_what_it_feeds_and_an_unset_one_nothing(tmp_path):
    from vlsafe.study.config import load_study
    from vlsafe.study.plan import build_plan
    from vlsafe.study.run import _fingerprint_or_missing

    def keys(**over) -> dict:
        config, _ = load_study(_config(tmp_path, "layer", **over))
        plan = build_plan(config)
        return {s.name: (s.key, s) for s in plan.dag.assign_keys(_fingerprint_or_missing)}

    plain, unset, layered = keys(), keys(tower_feature_layer=None), keys(tower_feature_layer=-2)
    assert {n: k for n, (k, _) in plain.items()} == {n: k for n, (k, _) in unset.items()}
    vlm0 = layered["vlm0"][1]
    assert vlm0.config["feature_layer"] == -2 and "--feature-layer -2" in vlm0.command
    assert "feature_layer" not in plain["vlm0"][1].config
    changed = {n for n in plain if plain[n][0] != layered[n][0]}
    assert {"vlm0", "stage1", "stage2-s0", "eval-adapted-s0"} <= changed
    assert "align" not in changed and "corpus" not in changed

@pytest.mark.skipif("VLSAFE_KILLS" not in os.environ,
                    reason="a kill campaign over the whole study: `make test-long` (VLSAFE_KILLS); `make test` kills "
                           "the study in stage 2 (test_kill_then_the_same_command_resumes_to_the_same_results)")
def test_a_killed_study_finishes_with_the_results_of_an_uninterrupted_run(tmp_path_factory, tmp_path):
    """`vlsafe study --profile pico` SIGKILLed at seeded random moments (any stage: training, evaluation, merge,
    the report), rerun each time in the same folder: every stage that looks finished after a kill equals the
    reference's, and the finished run equals an uninterrupted one (what is compared: killharness.same_study).
    VLSAFE_KILLS kills per seed (test-long: 6 kills x 4 seeds). Not in `make test`: one random kill cost a whole
    pico study run (83-136 s, the suite's longest test) for a sample that test-long takes 24 times."""
    reference = study_reference(tmp_path_factory, PICO_STUDY)
    case = study_case(PICO_STUDY)
    kills = int(os.environ.get("VLSAFE_KILLS", "1"))
    runs = [campaign(case, tmp_path, kills, seed, reference) for seed in SEEDS]
    total, landed = sum(r.kills for r in runs), [stage for r in runs for stage in r.landed]
    assert total >= 1, "study: every run finished before its kill time; nothing was tested"
    if total >= 4:  # a longer campaign reaches more than one stage (kills resume at later and later stages)
        assert len(set(landed)) >= 2, landed
    print(f"study: {total} SIGKILLs survived over seeds {SEEDS}, in {landed}")


def test_transformers_bars_are_off_during_the_study_and_the_hubs_download_bars_are_left_alone(capsys):
    """The study's display is the only one: transformers' per-model bars ("Loading weights", "Writing model shards")
    are silent inside it and back after it; the hub's download bars keep their setting."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from vlsafe.assets import quiet_transformers

    hf_logging.enable_progress_bar()
    with quiet_transformers():
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        assert not hub.are_progress_bars_disabled()
    assert "Loading weights" not in capsys.readouterr().err
    for _ in hf_logging.tqdm(range(3), desc="Writing model shards"):
        pass
    assert "Writing model shards" in capsys.readouterr().err and not hub.are_progress_bars_disabled()
