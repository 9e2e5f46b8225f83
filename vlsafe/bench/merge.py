"""`vlsafe bench merge`: wall time and peak memory of vlsafe's merge against mergekit's, on the same inputs.

Both run as fresh subprocesses (so neither inherits the other's imports or caches) on the same random plain-Llama
checkpoints written here; peak RSS is the child's own high-water mark (wait4). mergekit is a bench-only tool in
its own virtualenv (`.venv-bench`, see `find_mergekit`), never a vlsafe dependency. The outputs are compared
tensor by tensor, so a speed-up that changed the numbers would show.

    vlsafe bench merge --hidden 1024 --layers 8 --json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from vlsafe.errors import VlsafeError

METHOD_PARAMS = {
    "linear": ("", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "task_arithmetic": ("  lambda: 0.9\n", [None, {"weight": 0.6}, {"weight": 0.4}]),
    "ties": ("  lambda: 1.0\n", [None, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]),
}
REPO = Path(__file__).resolve().parents[2]


def find_mergekit(explicit: Optional[str] = None) -> Optional[Path]:
    for candidate in ([explicit] if explicit else []) + [str(REPO / ".venv-bench" / "bin" / "mergekit-yaml"),
                                                          shutil.which("mergekit-yaml")]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def write_llama(path: Path, hidden: int, layers: int, vocab: int, intermediate: int, seed: int,
                dtype: torch.dtype = torch.float32) -> None:
    """A random Llama checkpoint, written tensor by tensor (names and shapes from a meta-device model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlsafe.merge.shards import ShardWriter

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2,
                         num_key_value_heads=max(1, hidden // 256) if hidden >= 256 else 1, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False, dtype=str(dtype).split(".")[1],
                         architectures=["LlamaForCausalLM"])  # what save_pretrained of a model would record
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True)
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    names = sorted(shapes)
    writer = ShardWriter(path / "model.safetensors", [(n, shapes[n], dtype) for n in names])
    for name in names:
        writer.write(name, (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype))
    writer.close()


def _config(method: str, models: list[str]) -> str:
    shared, per_model = METHOD_PARAMS[method]
    text = f"merge_method: {method}\n"
    if per_model[0] is None:
        text += f"base_model: {models[0]}\n"
    text += "models:\n"
    for model, params in zip(models, per_model):
        text += f"  - model: {model}\n"
        if params:
            text += "    parameters: " + json.dumps(params) + "\n"
    if shared:
        text += "parameters:\n" + shared
    return text + "dtype: float32\n"


# Linux starts a child's peak-RSS record from its parent's at fork, so a child of this (large, torch-importing)
# process would inherit our footprint. A tiny launcher forks the measured command instead and reports its figures.
_LAUNCHER = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - start,
               "maxrss_kib": usage.ru_maxrss}, out)
"""


def _measure(command: list[str], log: Path) -> dict:
    result = log.with_suffix(".json")
    with open(log, "wb") as handle:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), *command], stdout=handle,
                       stderr=subprocess.STDOUT, check=False)
    figures = json.loads(result.read_text()) if result.is_file() else {"rc": -1}
    if figures["rc"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise VlsafeError(f"{command[0]} failed (exit {figures['rc']}): {' | '.join(tail)}")
    return {"wall_s": round(figures["wall_s"], 3), "peak_rss_mib": round(figures["maxrss_kib"] / 1024, 1)}


def _load_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                out[key] = handle.get_tensor(key)
    return out


def max_abs_diff(a: Path, b: Path) -> float:
    left, right = _load_all(a), _load_all(b)
    if left.keys() != right.keys():
        missing = sorted(left.keys() ^ right.keys())
        raise VlsafeError(f"outputs differ in tensor names ({len(missing)}, e.g. {missing[0]})")
    return max(((left[k].double() - right[k].double()).abs().max().item() for k in left if left[k].numel()),
               default=0.0)


def run(hidden: int = 1024, layers: int = 8, vocab: int = 32000, intermediate: Optional[int] = None,
        methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties"), repeat: int = 1,
        mergekit: Optional[str] = None, work: Optional[str] = None) -> dict:
    unknown = [m for m in methods if m not in METHOD_PARAMS]
    if unknown:
        raise VlsafeError(f"bench merge: unknown method {unknown[0]!r} (benchmarked: {', '.join(METHOD_PARAMS)})")
    mergekit_yaml = find_mergekit(mergekit)
    if mergekit_yaml is None:
        raise VlsafeError("bench merge: mergekit-yaml not found (make a plain venv .venv-bench with "
                          "`pip install torch==2.13.0 mergekit==0.1.5`, or pass --mergekit PATH)")
    root = Path(tempfile.mkdtemp(prefix="vlsafe-bench-merge-", dir=work))
    try:
        models = [root / f"model_{i}" for i in range(3)]
        for i, model in enumerate(models):
            write_llama(model, hidden, layers, vocab, intermediate or hidden * 11 // 4, seed=i)
        size = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
        # flush the fresh checkpoints and read them once, so neither tool pays for writeback or a cold cache
        os.sync()
        for file in sorted(root.glob("model_*/*.safetensors")):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        vlsafe_cmd = [sys.executable, "-c", "import sys; from vlsafe.cli import main; sys.exit(main(sys.argv[1:]))"]
        runs = []
        for method in methods:
            config = root / f"{method}.yaml"
            config.write_text(_config(method, [str(m) for m in models]))
            row: dict = {"method": method, "vlsafe": [], "mergekit": []}
            for attempt in range(repeat):
                # alternate who goes first, so a warm page cache favours neither
                order = ["vlsafe", "mergekit"] if attempt % 2 == 0 else ["mergekit", "vlsafe"]
                for tool in order:
                    out = root / f"out-{method}-{tool}-{attempt}"
                    command = (vlsafe_cmd + ["merge", str(config), "--out", str(out)] if tool == "vlsafe"
                               else [str(mergekit_yaml), str(config), str(out)])
                    row[tool].append(_measure(command, root / f"{tool}.log"))
            row["max_abs_diff"] = max_abs_diff(root / f"out-{method}-vlsafe-0", root / f"out-{method}-mergekit-0")
            for tool in ("vlsafe", "mergekit"):
                samples = row[tool]
                row[tool] = {"wall_s": min(s["wall_s"] for s in samples),
                             "peak_rss_mib": max(s["peak_rss_mib"] for s in samples), "runs": samples}
            runs.append(row)
        return {"format": "vlsafe.bench_merge/1",
                "inputs": {"models": 3, "hidden": hidden, "layers": layers, "vocab": vocab, "dtype": "float32",
                           "bytes_per_model": size},
                "mergekit": str(mergekit_yaml), "repeat": repeat, "runs": runs,
                "note": "wall_s is the best of the repeats, peak_rss_mib the worst; both include interpreter start "
                        "and imports"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for row in report["runs"]:
        v, m = row["vlsafe"], row["mergekit"]
        rows.append([row["method"], f"{v['wall_s']:.2f}", f"{m['wall_s']:.2f}", f"{v['peak_rss_mib']:.0f}",
                     f"{m['peak_rss_mib']:.0f}", f"{row['max_abs_diff']:.2e}"])
    return rows
