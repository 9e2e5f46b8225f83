"""vlsafe against mergekit on the same pico Llama checkpoints. mergekit lives only in the bench virtualenv
(.venv-bench, a plain venv with torch==2.13.0 and mergekit==0.1.5); without it these tests skip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from vlsafe.bench.merge import find_mergekit, max_abs_diff, run, write_llama
from vlsafe.cli import main

MERGEKIT = find_mergekit()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (.venv-bench absent)")

# one interpreter for all of mergekit's merges: its import is most of its run time
MERGEKIT_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out,
              MergeOptions(copy_tokenizer=False, quiet=True))
"""


def _configs(a: str, b: str, c: str) -> dict:
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.5}},
            {"model": b, "parameters": {"weight": [0.1, 0.9]}},
            {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "parameters": {"lambda": 0.8},
                            "models": [{"model": b, "parameters": {"weight": [0.2, 0.6, 1.0]}},
                                       {"model": c, "parameters": {"weight": -0.3}}]},
        "ties": {"merge_method": "ties", "base_model": a, "parameters": {"density": 0.6},
                 "models": [{"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                            {"model": c, "parameters": {"weight": [{"filter": "self_attn", "value": 0.2},
                                                                   {"value": 0.5}]}}]},
    }


def test_linear_task_arithmetic_and_ties_equal_mergekit(tmp_path):
    models = [tmp_path / name for name in "abc"]
    for seed, path in enumerate(models):
        write_llama(path, hidden=16, layers=3, vocab=64, intermediate=32, seed=seed)
    args = []
    for method, config in _configs(*map(str, models)).items():
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        args += [str(tmp_path / f"{method}.yaml"), str(tmp_path / f"mergekit-{method}")]
        assert main(["merge", str(tmp_path / f"{method}.yaml"), "--out", str(tmp_path / f"vlsafe-{method}")]) == 0
    python = MERGEKIT.parent / "python"
    done = subprocess.run([str(python), "-c", MERGEKIT_SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for method in _configs("a", "b", "c"):
        diff = max_abs_diff(tmp_path / f"vlsafe-{method}", tmp_path / f"mergekit-{method}")
        assert diff <= 1e-6, (method, diff)


def test_bench_merge_reports_both_tools_side_by_side(tmp_path):
    report = run(hidden=16, layers=2, vocab=64, methods=("linear",), work=str(tmp_path))
    (row,) = report["runs"]
    assert row["method"] == "linear" and row["max_abs_diff"] <= 1e-6
    for tool in ("vlsafe", "mergekit"):
        assert row[tool]["wall_s"] > 0 and row[tool]["peak_rss_mib"] > 0
    assert not any(Path(tmp_path).iterdir())  # the bench cleans up its scratch checkpoints
