"""The heap setting for CPU runs (vlsafe/allocator.py): freed big blocks are reused, not faulted in again."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from vlsafe import allocator
    applied = allocator.tune("cpu") if sys.argv[1] == "tune" else "untouched"
    torch.manual_seed(0)
    # a feed-forward block's allocations (11520 tokens x 1536: 70 MB activations, above glibc's largest mmap
    # threshold) at a narrow model width, so the probe costs allocations rather than matmul time
    x, w1, w2 = torch.randn(11520, 64), torch.randn(64, 1536), torch.randn(1536, 64)

    def mlp(x):
        return (torch.nn.functional.silu(x @ w1) * (x @ w1)) @ w2 + x

    for _ in range(8):  # the heap grows to its working size
        y = mlp(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        y = mlp(x)
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")



def _probe(mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_heap_reuses_freed_blocks():
    plain, tuned = _probe("plain"), _probe("tune")
    assert tuned["applied"].startswith("heap (no mmap, no trim")
    # every 70 MB block fresh from the kernel is 17k faults of 4 KiB; a reused heap block takes none
    assert plain["faults"] > 100_000
    assert tuned["faults"] < plain["faults"] / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_user_can_keep_the_system_allocator():
    kept = _probe("tune", VLSAFE_MALLOC="system")
    assert kept["applied"] == "system (VLSAFE_MALLOC=system)"
    assert kept["faults"] > 100_000


def test_gpu_runs_are_left_alone():
    probe = "from vlsafe import allocator; print(allocator.tune('cuda'), allocator.state())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["system", "system"]  # a fresh process: a GPU run does not set the heap


def test_a_bad_setting_is_one_line_exit_2_and_no_output(tmp_path, monkeypatch, capsys):
    from vlsafe import allocator
    from vlsafe.cli import main

    monkeypatch.setattr(allocator, "_state", {"applied": None})  # as in a fresh process
    monkeypatch.setenv("VLSAFE_MALLOC", "jemalloc")
    out = tmp_path / "eval"
    assert main(["eval", "--model", "pico", "--suite", "quick", "--limit", "1", "--out", str(out),
                 "--cache", str(tmp_path / "c.sqlite")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: VLSAFE_MALLOC='jemalloc': 'heap' (the default) or 'system'"] and not out.exists()
