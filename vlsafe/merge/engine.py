"""Runs a merge plan: streams tensors from the inputs through a method into sharded safetensors.

Memory: one output tensor at a time, each input's copy of it read on demand, so the peak is about the largest
tensor times the number of inputs (plus float32 work copies), never the model size. The output directory is
built beside the target and renamed into place only when complete: an error or interrupt leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from vlsafe.errors import VlsafeError
from vlsafe.io import atomic_dir, sha256_file, versions, write_json
from vlsafe.merge import card
from vlsafe.merge import config as merge_config
from vlsafe.merge.plan import Plan, Step, build
from vlsafe.merge.shards import INDEX, PICKLED, Reader, ShardWriter, nbytes, plan_shards, shard_names

# provenance files of the base that would be false for the merged model; weights are written fresh
NOT_COPIED = {"README.md", "vlsafe.json", "merge_manifest.json", "merge_config.yaml", "mergekit_config.yml", INDEX,
              ".gitattributes"}
DEFAULT_SHARD_SIZE = "5GB"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '4096' -> bytes (decimal units, as HF's max_shard_size)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
        if not match:
            raise VlsafeError(f"shard size {text!r}: expected a size like 5GB, 500MB or a byte count")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise VlsafeError(f"shard size {text!r} must be positive")
    return size


def merge(config_path: str | Path, out: str | Path, shard_size: str | int = DEFAULT_SHARD_SIZE,
          progress: bool = True) -> dict:
    """`vlsafe merge CONFIG.yaml --out DIR`: returns the manifest's summary."""
    config_path = Path(config_path)
    config = merge_config.load(config_path)
    return run(config, out, config_dir=config_path.resolve().parent, shard_size=shard_size, progress=progress)


def run(config: merge_config.MergeConfig, out: str | Path, config_dir: Optional[Path] = None,
        shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    max_bytes = parse_size(shard_size)
    plan = build(config, config_dir)  # every input check happens here, before anything is written
    # input hashes are provenance, not needed by the merge: hash on a second thread while the merge runs
    pool = ThreadPoolExecutor(max_workers=1)
    hashes = {ref: {f.name: pool.submit(sha256_file, f) for f in sorted({i.file for i in inp.tensors.values()})}
              for ref, inp in plan.inputs.items()}
    try:
        with atomic_dir(out) as tmp:
            written = _write_tensors(plan, tmp, max_bytes, progress)
            _copy_base_files(plan, tmp)
            input_hashes = {ref: {name: job.result() for name, job in files.items()} for ref, files in hashes.items()}
            manifest = _manifest(plan, written, input_hashes)
            (tmp / "merge_config.yaml").write_text(merge_config.dump(config))
            write_json(tmp / "merge_manifest.json", manifest)
            (tmp / "README.md").write_text(card.render(config, manifest))
            write_json(tmp / "vlsafe.json", {"source": "merge", "provenance": {"merge": manifest["summary"],
                                                                              "inputs": manifest["inputs"]},
                                             "content_sha256": _content_hash(written["shards"]),
                                             "versions": versions()})
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on failure, do not keep hashing gigabytes
    return manifest["summary"]


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor, seeded by (seed, tensor name): a DARE merge is reproducible whatever the tensor
    order, sharding or subset of tensors merged."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def compute(plan: Plan, step: Step, reader: Reader) -> torch.Tensor:
    if step.action == "copy":
        (ref, key), = step.sources
        return reader.read(plan.inputs[ref].tensors[key]).to(step.dtype)
    tensors = []
    for ref, key in step.sources:
        tensor = reader.read(plan.inputs[ref].tensors[key])[:step.rows]  # rows=None: all of them
        # casting the inputs first mirrors mergekit's `dtype`: the merge sees the values it would see
        tensors.append(tensor.to(plan.compute_dtype) if plan.compute_dtype is not None else tensor)
    method = plan.config.method
    base, others = (tensors[0], tensors[1:]) if method.needs_base else (None, tensors)
    generator = _generator(plan.config.seed, step.name) if method.seeded else None
    merged = method.apply(base, others, step.per_input, step.shared, generator).to(step.dtype)
    if step.rows is None:
        return merged
    # vocab: common: the rows only the output's own vocabulary has are the layout model's, unchanged
    extra = reader.read(plan.inputs[plan.config.layout_model].tensors[step.name])[step.rows:]
    return torch.cat([merged, extra.to(step.dtype)])


def _write_tensors(plan: Plan, tmp: Path, max_bytes: int, progress: bool) -> dict:
    entries = [(s.name, s.shape, s.dtype) for s in plan.steps]
    groups = plan_shards(entries, max_bytes)
    names = shard_names(len(groups))
    shard_of: dict[str, str] = {}
    shards: dict[str, str] = {}
    reader = Reader()
    bar = _progress(len(plan.steps), progress)
    try:
        for name, group in zip(names, groups):
            writer = ShardWriter(tmp / name, [entries[i] for i in group])
            for i in group:
                step = plan.steps[i]
                writer.write(step.name, compute(plan, step, reader))
                shard_of[step.name] = name
                bar(1)
            shards[name] = writer.close()
    finally:
        reader.close()
        bar(None)
    total = sum(nbytes(shape, dtype) for _, shape, dtype in entries)
    if len(names) > 1:
        write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": shard_of})
    return {"shard_of": shard_of, "shards": shards, "total_size": total}


def _progress(total: int, enabled: bool):
    """A progress bar on stderr when it is a terminal; a no-op otherwise (tests, logs)."""
    if not enabled or not sys.stderr.isatty():
        return lambda advance: None
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    task = bar.add_task("merging tensors", total=total)
    bar.start()

    def advance(n):
        if n is None:
            bar.stop()
        else:
            bar.advance(task, n)
    return advance


def _copy_base_files(plan: Plan, tmp: Path) -> None:
    """config.json, generation config, tokenizer, chat template, image processor: the base model's, unchanged
    except for the dtype when the merge changed it."""
    source = plan.inputs[plan.config.layout_model].path
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.suffix in (".safetensors", *PICKLED):
            continue
        shutil.copy2(path, tmp / path.name)
    out_dtype = plan.config.out_dtype or plan.config.dtype
    config_file = tmp / "config.json"
    if out_dtype and config_file.is_file():
        data = json.loads(config_file.read_text())
        name = merge_config.DTYPES[out_dtype]
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = name
        write_json(config_file, data)


def _content_hash(shards: dict[str, str]) -> str:
    """The same digest as vlsafe.model.checkpoint.content_hash (sha256 over 'file:sha' lines), computed from the
    hashes taken while writing, so the evaluation cache can key this model without rereading it."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(shards.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _manifest(plan: Plan, written: dict, input_hashes: dict) -> dict:
    tensors = []
    counts: dict[str, int] = {}
    for step in plan.steps:
        entry = {"name": step.name, "shape": list(step.shape), "dtype": str(step.dtype).removeprefix("torch."),
                 "shard": written["shard_of"][step.name]}
        if step.action == "copy":
            entry.update(action="copied", source=step.sources[0][0], source_tensor=step.sources[0][1])
            reason = step.note
        else:
            base = plan.config.layout_model if plan.config.method.needs_base else None
            merged = step.sources[1:] if base else step.sources
            entry.update(action="merged", method=plan.config.merge_method, base=base,
                         inputs=[{"model": ref, "tensor": key, **values}
                                 for (ref, key), values in zip(merged, step.per_input)],
                         parameters=step.shared)
            if step.layer is not None:
                entry.update(layer=step.layer, t=round(step.t, 6))
            reason = f"merged ({plan.config.merge_method})"
            if step.rows is not None:
                entry["vocab"] = {"mode": "common", "merged_rows": [0, step.rows],
                                  "copied_rows": [step.rows, step.shape[0]], "copied_from": plan.config.layout_model,
                                  "input_rows": {ref: plan.inputs[ref].tensors[key].shape[0]
                                                 for ref, key in step.sources}}
                reason += ", vocabulary rows only the base has copied from it"
        if step.note:
            entry["note"] = step.note
        counts[reason] = counts.get(reason, 0) + 1
        tensors.append(entry)
    inputs = {ref: {"path": str(inp.path), "layout": inp.layout.name, "tensors": len(inp.tensors),
                    "sha256": input_hashes[ref]} for ref, inp in plan.inputs.items()}
    summary = {"method": plan.config.merge_method, "output_tensors": len(tensors),
               "merged": sum(1 for t in tensors if t["action"] == "merged"),
               "copied": sum(1 for t in tensors if t["action"] == "copied"), "by_reason": counts,
               "unused_input_tensors": plan.unused, "shards": len(written["shards"]),
               "total_bytes": written["total_size"]}
    return {"format": "vlsafe.merge_manifest/1", "summary": summary, "inputs": inputs,
            "output_layout": plan.inputs[plan.config.layout_model].layout.name, "num_layers": plan.num_layers,
            "shards": written["shards"], "config": plan.config.model_dump(mode="json"), "versions": versions(),
            "tensors": tensors}
