"""`vlsafe analyze weights`: how far each model moved from a base, per layer and module, and how the updates of a
chain of models relate to each other (task-vector cosine and TIES sign conflicts, per layer).

Tensors are matched by the merge engine's canonical names (merge/layout.py), so a text LLM's
`model.layers.3.mlp.up_proj.weight` lines up with its VLM's `language_model.model.layers.3.mlp.up_proj.weight`;
parts only some models have (projector, tower) are compared between the models that have them. Each tensor is read
from every model a block of rows at a time and reduced to a few sums before the next block, so the memory is a few
blocks per model (BLOCK_ENTRIES), never a model: a 7B chain needs less memory than one 7B model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlsafe.analysis.output import header, pyplot, rounded
from vlsafe.errors import VlsafeError
from vlsafe.merge import layout as layouts
from vlsafe.merge.plan import Input, load_input
from vlsafe.merge.shards import Reader

# a decoder layer's modules in the order a reader expects them (others follow, sorted)
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                "post_attention_layernorm")
BLOCK_ENTRIES = 1 << 22  # entries per model read at once (16 MB in float32): the memory, whatever the model size
WHOLE = "*"  # the module of a row that sums a whole layer (or, with layer null, every compared tensor)


@dataclass(frozen=True)
class TaskVector:
    """The update `child - parent` (both model names of the analysis)."""
    child: str
    parent: str

    @property
    def name(self) -> str:
        return f"{self.child}-{self.parent}"

    @property
    def models(self) -> tuple[str, str]:
        return self.child, self.parent


def group_of(component: str, canonical: str) -> tuple[Optional[int], str]:
    """(decoder layer or None, module) of a canonical tensor name: `model.layers.3.self_attn.q_proj.weight` ->
    (3, "q_proj"), `model.embed_tokens.weight` -> (None, "embed_tokens"); projector and tower are one group each."""
    if component != "language_model":
        return None, component
    parts = canonical.split(".")
    module = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return layouts.layer_of(component, canonical), module


def module_sort_key(module: str) -> tuple:
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


def parse_task_vector(text: str, names: list[str]) -> TaskVector:
    """"X-Y" -> TaskVector(X, Y), where X and Y are model names; names may contain "-" themselves, so every split
    is tried and exactly one must name two models."""
    fits = [TaskVector(text[:i], text[i + 1:]) for i, char in enumerate(text)
            if char == "-" and text[:i] in names and text[i + 1:] in names]
    if len(fits) != 1:
        why = "names no two models" if not fits else "splits into model names in more than one way"
        raise VlsafeError(f"task vector {text!r} {why} (write CHILD-PARENT with model names: {', '.join(names)})")
    if fits[0].child == fits[0].parent:
        raise VlsafeError(f"task vector {text!r} is a model minus itself")
    return fits[0]


def default_pairs(chain: list[str]) -> list[tuple[TaskVector, TaskVector]]:
    """Consecutive updates of the chain base -> m1 -> m2 ...: (m1 - base, m2 - m1), (m2 - m1, m3 - m2), ..."""
    vectors = [TaskVector(child, parent) for parent, child in zip(chain, chain[1:])]
    return list(zip(vectors, vectors[1:]))


def _names(paths: list[str], names: Optional[list[str]]) -> list[str]:
    if names is None:
        names = [Path(p).name or str(p) for p in paths]
        seen: dict[str, int] = {}
        for i, name in enumerate(names):  # two checkpoints called `final`: final, final#2
            seen[name] = seen.get(name, 0) + 1
            names[i] = name if seen[name] == 1 else f"{name}#{seen[name]}"
    if len(names) != len(paths):
        raise VlsafeError(f"{len(names)} names for {len(paths)} models (one name per model, the base first)")
    if len(set(names)) != len(names):
        raise VlsafeError(f"model names must differ: {names}")
    return list(names)


def _components(inp: Input) -> set[str]:
    return {component for component, _ in inp.canonical}


def is_vlm(inp: Input) -> bool:
    return "projector" in _components(inp)


def check_inputs(inputs: dict[str, Input]) -> None:
    """Chain order (text LLMs before VLMs) and matching tensors: every pair of models must hold the same tensor
    names with the same shapes in the parts both have (vocabulary tensors may differ in rows only). The first
    mismatch is the error."""
    names = list(inputs)
    for earlier, later in zip(names, names[1:]):
        if is_vlm(inputs[earlier]) and not is_vlm(inputs[later]):
            raise VlsafeError(f"model {later!r} ({inputs[later].path}) is a text LLM but follows the VLM {earlier!r}: "
                              "a chain goes from LLMs to VLMs (base LLM -> aligned LLM -> VLMs)")
    for a, b in itertools.combinations(names, 2):
        shared = _components(inputs[a]) & _components(inputs[b])
        keys_a = {k for k in inputs[a].canonical if k[0] in shared}
        keys_b = {k for k in inputs[b].canonical if k[0] in shared}
        missing = sorted([(b, a, k) for k in keys_a - keys_b] + [(a, b, k) for k in keys_b - keys_a],
                         key=lambda item: item[2])
        if missing:
            missing_in, has, key = missing[0]
            raise VlsafeError(f"model {missing_in!r} has no tensor matching {inputs[has].canonical[key]!r} of "
                              f"{has!r}: the architectures or layer counts differ")
        for key in sorted(keys_a):
            info_a = inputs[a].tensors[inputs[a].canonical[key]]
            info_b = inputs[b].tensors[inputs[b].canonical[key]]
            if info_a.shape == info_b.shape:
                continue
            if layouts.is_vocab(*key) and info_a.shape[1:] == info_b.shape[1:]:
                continue  # a VLM's added <image> row: the shared rows are compared
            raise VlsafeError(f"shape mismatch for {inputs[a].canonical[key]!r}: {list(info_a.shape)} in {a!r} but "
                              f"{list(info_b.shape)} in {b!r}: the architectures differ")


class _Sums(dict):
    """Named float64 sums per group key, created on first use."""

    def add(self, key, **values) -> None:
        sums = self.setdefault(key, {})
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value)


def _square(t: torch.Tensor) -> float:
    return float(torch.sum(t * t, dtype=torch.float64))


def analyze(base: str, models: list[str], out, names: Optional[list[str]] = None,
            pairs: Optional[list[tuple[str, str]]] = None, emit_merge=None, gate_threshold: float = 0.0,
            gate_weight: float = 1.0, progress: bool = True) -> dict:
    """Writes the new directory `out` (analysis.json, PNG figures) and returns the analysis.json object.

    `pairs`: task vectors to compare, each "CHILD-PARENT" in model names (default: consecutive updates of the chain
    base -> models). `emit_merge`: also write a merge YAML that applies the second update of the first pair in the
    layers where its cosine with the first update is below `gate_threshold` (merges.cosine_gated_merge).
    """
    from vlsafe.io import atomic_dir, write_json

    if not models:
        raise VlsafeError("analyze weights needs at least one model besides the base")
    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    paths = [str(base), *map(str, models)]
    names = _names(paths, names)
    inputs = {name: load_input(path, None) for name, path in zip(names, paths)}
    check_inputs(inputs)
    if pairs is None:
        vector_pairs = default_pairs(names)
    else:
        vector_pairs = [(parse_task_vector(a, names), parse_task_vector(b, names)) for a, b in pairs]
    if emit_merge is not None and not vector_pairs:
        raise VlsafeError("--emit-merge gates layers by the cosine of two updates: give at least two models (a chain "
                          "base -> a -> b) or a --pair")
    base_name, model_names = names[0], names[1:]
    changes, vectors, vocab_rows = _stream(inputs, base_name, model_names, vector_pairs, progress)

    result = header("weights")
    result.update({
        "models": [{"name": n, "role": "base" if n == base_name else "model", "path": str(inputs[n].path),
                    "layout": inputs[n].layout.name, "is_vlm": is_vlm(inputs[n]), "tensors": len(inputs[n].tensors)}
                   for n in names],
        "base": base_name,
        "num_layers": _num_layers(inputs[base_name]),
        "task_vector_pairs": [{"a": a.name, "b": b.name} for a, b in vector_pairs],
        "weights": _change_rows(changes, model_names),
        "task_vectors": _vector_rows(vectors, vector_pairs),
        "vocab_rows": vocab_rows,
    })
    with atomic_dir(out) as tmp:
        result["figures"] = plot(result, tmp)
        if emit_merge is not None:
            from vlsafe.analysis import merges

            a, b = vector_pairs[0]
            cosines = {r["layer"]: r["cosine"] for r in result["task_vectors"]
                       if r["a"] == a.name and r["b"] == b.name and r["layer"] is not None}
            config = merges.cosine_gated_merge(str(inputs[b.parent].path), str(inputs[b.child].path), cosines,
                                               threshold=gate_threshold, weight=gate_weight)
            result["emitted_merge"] = {"path": str(emit_merge), **merges.describe(config)}
            merges.write(config, emit_merge, f"from `vlsafe analyze weights`: {b.name} applied with weight "
                         f"{gate_weight} in the layers where cos({a.name}, {b.name}) < {gate_threshold}")
        write_json(tmp / "analysis.json", result)
    return result


def _num_layers(inp: Input) -> int:
    layers = {layouts.layer_of(*key) for key in inp.canonical} - {None}
    return max(layers) + 1 if layers else 0


def _stream(inputs: dict[str, Input], base: str, models: list[str], vector_pairs, progress: bool):
    """One pass over every tensor name: the sums behind every row."""
    from vlsafe.progress import Steps

    keys = sorted(set().union(*(inp.canonical for inp in inputs.values())))
    changes, vectors = _Sums(), _Sums()
    vocab_rows: dict[str, dict] = {}
    reader = Reader()
    try:
        with Steps("comparing tensors", len(keys), unit="tensors", enabled=progress) as bar:
            for component, canonical in keys:
                holders = {n: inp.tensors[inp.canonical[(component, canonical)]] for n, inp in inputs.items()
                           if (component, canonical) in inp.canonical}
                bar.advance()
                if not next(iter(holders.values())).dtype.is_floating_point:
                    continue  # integer buffers (position ids) are not weights
                layer, module = group_of(component, canonical)
                for first, tensors in _blocks(reader, holders, canonical, vocab_rows):
                    _add_changes(changes, tensors, base, models, layer, module, count=int(first))
                    _add_vectors(vectors, tensors, vector_pairs, layer, module)
    finally:
        reader.close()
    return changes, vectors, vocab_rows


def _blocks(reader: Reader, holders: dict, canonical: str, vocab_rows: dict):
    """(first block?, {model: float32 block}) over blocks of rows of one tensor in every model that has it: every
    sum is additive, so an embedding matrix need not be in memory whole, once per model. Models whose vocabularies
    differ are compared on the rows all have (recorded in `vocab_rows`)."""
    shape = next(iter(holders.values())).shape
    if not shape:
        yield True, {n: reader.read(info).float() for n, info in holders.items()}
        return
    rows = {n: info.shape[0] for n, info in holders.items()}
    keep = min(rows.values())
    if len(set(rows.values())) > 1:
        vocab_rows[canonical] = {"compared_rows": keep, "rows": rows}
    step = max(1, BLOCK_ENTRIES // max(1, math.prod(shape[1:])))
    for start in range(0, max(keep, 1), step):
        yield start == 0, {n: reader.read_rows(info, start, min(start + step, keep)).float()
                           for n, info in holders.items()}


def _add_changes(sums: _Sums, tensors: dict, base: str, models: list[str], layer, module, count: int) -> None:
    if base not in tensors:
        return
    reference = tensors[base]
    base_square = _square(reference)
    for model in models:
        if model in tensors:
            delta_square = _square(tensors[model] - reference)
            for key in _group_keys(model, layer, module):
                sums.add(key, delta=delta_square, base=base_square, tensors=count)


def _add_vectors(sums: _Sums, tensors: dict, vector_pairs, layer, module) -> None:
    for a, b in vector_pairs:
        if not all(m in tensors for m in a.models + b.models):
            continue
        delta_a = tensors[a.child] - tensors[a.parent]
        delta_b = tensors[b.child] - tensors[b.parent]
        both = (delta_a != 0) & (delta_b != 0)
        values = {"dot": float(torch.sum(delta_a * delta_b, dtype=torch.float64)), "square_a": _square(delta_a),
                  "square_b": _square(delta_b), "both_nonzero": int(both.sum()),
                  "conflicts": int((both & ((delta_a > 0) != (delta_b > 0))).sum()), "entries": delta_a.numel()}
        for key in _group_keys((a.name, b.name), layer, module):
            sums.add(key, **values)


def _group_keys(owner, layer, module) -> list[tuple]:
    """A tensor counts towards its own group, its layer's total (decoder layers) and the whole-model total."""
    keys = [(owner, layer, module)]
    if layer is not None:
        keys.append((owner, layer, WHOLE))
    keys.append((owner, None, WHOLE))
    return keys


def _row_order(layer, module) -> tuple:
    # groups outside the decoder layers first (embeddings, projector, tower), then layer by layer, totals last
    return (layer is not None, -1 if layer is None else layer, module == WHOLE, module_sort_key(module))


def _change_rows(sums: _Sums, models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        groups = sorted(((layer, module) for owner, layer, module in sums if owner == model),
                        key=lambda group: _row_order(*group))
        for layer, module in groups:
            s = sums[(model, layer, module)]
            base_norm, delta_norm = s["base"] ** 0.5, s["delta"] ** 0.5
            rows.append({"model": model, "layer": layer, "module": module, "tensors": int(s["tensors"]),
                         "relative_change": rounded(delta_norm / base_norm) if base_norm > 0 else None,
                         "delta_norm": rounded(delta_norm), "base_norm": rounded(base_norm)})
    return rows


def _vector_rows(sums: _Sums, vector_pairs) -> list[dict]:
    rows = []
    for a, b in vector_pairs:
        owner = (a.name, b.name)
        groups = sorted(((layer, module) for o, layer, module in sums if o == owner),
                        key=lambda group: _row_order(*group))
        for layer, module in groups:
            if layer is not None and module != WHOLE:
                continue  # per layer, the whole layer: one cosine per layer is what the gate and the plot use
            s = sums[(owner, layer, module)]
            norms = s["square_a"] ** 0.5, s["square_b"] ** 0.5
            rows.append({"a": a.name, "b": b.name, "layer": layer, "module": module,
                         "cosine": rounded(s["dot"] / (norms[0] * norms[1])) if min(norms) > 0 else None,
                         "sign_conflict_rate": rounded(s["conflicts"] / s["both_nonzero"]) if s["both_nonzero"]
                         else None,
                         "norm_a": rounded(norms[0]), "norm_b": rounded(norms[1]),
                         "both_nonzero": int(s["both_nonzero"]), "entries": int(s["entries"])})
    return rows


def plot(result: dict, out: Path) -> list[str]:
    """weights_heatmap.png (layer x module relative change, one panel per model) and task_vector_cosine.png
    (cosine and sign-conflict rate per layer, one line per pair)."""
    plt = pyplot()
    figures = []
    layered = [r for r in result["weights"] if r["layer"] is not None and r["module"] != WHOLE]
    models = list(dict.fromkeys(r["model"] for r in layered))
    if models:
        modules = sorted({r["module"] for r in layered}, key=module_sort_key)
        layers = sorted({r["layer"] for r in layered})
        fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 0.55 * len(modules) * len(models) + 1.5 * len(models),
                                                          1.5 + 0.28 * len(layers)), squeeze=False,
                                 constrained_layout=True)
        for ax, model in zip(axes[0], models):
            grid = torch.full((len(layers), len(modules)), float("nan"))
            for r in layered:
                if r["model"] == model and r["relative_change"] is not None:
                    grid[layers.index(r["layer"]), modules.index(r["module"])] = r["relative_change"]
            image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", origin="lower")
            ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
            ax.set_ylabel("layer")
            ax.set_title(f"{model} vs {result['base']}", fontsize=9)
            fig.colorbar(image, ax=ax, label="||dW|| / ||W||")
        fig.savefig(out / "weights_heatmap.png", dpi=110)
        plt.close(fig)
        figures.append("weights_heatmap.png")
    per_layer = [r for r in result["task_vectors"] if r["layer"] is not None]
    if per_layer:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
        for pair in result["task_vector_pairs"]:
            rows = [r for r in per_layer if r["a"] == pair["a"] and r["b"] == pair["b"]]
            label = f"{pair['a']} vs {pair['b']}"
            top.plot([r["layer"] for r in rows], [r["cosine"] for r in rows], marker="o", label=label)
            bottom.plot([r["layer"] for r in rows], [r["sign_conflict_rate"] for r in rows], marker="o", label=label)
        top.axhline(0, color="gray", lw=0.8)
        top.set_ylabel("cosine of the updates")
        bottom.axhline(0.5, color="gray", lw=0.8, ls="--")  # what unrelated updates give
        bottom.set_ylabel("TIES sign-conflict rate")
        bottom.set_xlabel("layer")
        top.legend(fontsize=7)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        fig.savefig(out / "task_vector_cosine.png", dpi=110)
        plt.close(fig)
        figures.append("task_vector_cosine.png")
    return figures
