"""Merge configs that restore safety, as data for `vlsafe merge` (mergekit-style YAML; merge/config.py).

Each builder is a pure function of model paths and numbers that returns the config as a dict; `write` validates it
against the merge schema and writes it. The analysis builds two of them from what it found; the published ones are
plain configurations of the same engine:

- safety_layer_merge: one model's weights in a layer range (the safety layers), another's elsewhere.
- cosine_gated_merge (the SafeMERGE idea, arXiv:2503.17239): a safer model's update applied only in the layers
  where the two updates disagree (per-layer cosine below a threshold); elsewhere the base is kept.
- resta (arXiv:2402.11746): adapted + s * (aligned - unaligned), a safety vector added back.
- expo (arXiv:2404.16792): sft + a * (sft - parent), extrapolating past a safety-tuned model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from vlsafe.errors import VlsafeError


def safety_layer_merge(adapted: str, aligned: str, layer_range: tuple[int, int]) -> dict:
    """`aligned`'s weights in the decoder layers [start, end), `adapted`'s everywhere else (its embeddings,
    projector and tower included). `aligned` may be the text LLM the VLM `adapted` was built from."""
    start, end = int(layer_range[0]), int(layer_range[1])
    return {"merge_method": "linear", "models": [{"model": adapted, "parameters": {"weight": 1.0}}],
            "layers": [{"layer_range": [start, end], "source": aligned}]}


def gated_layers(cosines: dict[int, Optional[float]], threshold: float) -> list[int]:
    """The layers whose update cosine is below `threshold` (a layer without a cosine, e.g. an update of zero, is
    not gated)."""
    return sorted(layer for layer, cosine in cosines.items() if cosine is not None and cosine < threshold)


def ranges(layers: list[int]) -> list[tuple[int, int]]:
    """Consecutive layers as half-open ranges: [2, 3, 7] -> [(2, 4), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if out and out[-1][1] == layer:
            out[-1] = (out[-1][0], layer + 1)
        else:
            out.append((layer, layer + 1))
    return out


def cosine_gated_merge(base: str, safer: str, cosines: dict[int, Optional[float]], threshold: float = 0.0,
                       weight: float = 1.0) -> dict:
    """base + weight * (safer - base) in the layers where the cosine is below `threshold`, base elsewhere.

    With the cosines of (adaptation update, safety update) per layer and base = the adapted model, safer = its
    safety-tuned child, the safety update lands only where it pulls against the adaptation.
    """
    gated = gated_layers(cosines, threshold)
    if not gated:
        shown = ", ".join(f"{layer}: {cosine}" for layer, cosine in sorted(cosines.items()))
        raise VlsafeError(f"no layer has an update cosine below {threshold} ({shown}); raise --gate-threshold")
    return {"merge_method": "task_arithmetic", "base_model": base,
            # weight 0 outside the gated layers: the base's tensors come out unchanged
            "models": [{"model": safer, "parameters": {"weight": 0.0}}],
            "layers": [{"layer_range": [start, end], "parameters": {"weight": float(weight)}}
                       for start, end in ranges(gated)],
            "vocab": "common"}


def resta(adapted: str, aligned: str, unaligned: str, scale: float = 1.0) -> dict:
    """RESTA: adapted + scale * (aligned - unaligned).

    As task arithmetic over the base `adapted`: adapted + s (aligned - adapted) - s (unaligned - adapted) is the
    same sum, and the output keeps the adapted model's layout, so `aligned` and `unaligned` may be the text LLMs a
    VLM was built from (their missing projector and tower leave the VLM's unchanged; `vocab: common` keeps its
    image-token row)."""
    return {"merge_method": "task_arithmetic", "base_model": adapted,
            "models": [{"model": aligned, "parameters": {"weight": float(scale)}},
                       {"model": unaligned, "parameters": {"weight": -float(scale)}}],
            "vocab": "common"}


def expo(sft: str, parent: str, alpha: float = 0.5) -> dict:
    """ExPO: sft + alpha * (sft - parent), i.e. task arithmetic over the base `sft` with weight -alpha on `parent`
    (the output keeps the safety-tuned model's layout, config and tokenizer)."""
    if alpha < 0:
        raise VlsafeError(f"ExPO extrapolates past the safety-tuned model: alpha must be >= 0 (got {alpha})")
    return {"merge_method": "task_arithmetic", "base_model": sft,
            "models": [{"model": parent, "parameters": {"weight": -float(alpha)}}], "vocab": "common"}


def describe(config: dict) -> dict:
    """What a config does to which layers, for analysis.json."""
    return {"merge_method": config["merge_method"], "base_model": config.get("base_model"),
            "layers": config.get("layers", [])}


def write(config: dict, path, comment: str = "") -> Path:
    """Validates `config` against the merge schema, then writes it (atomically) with a comment header."""
    from vlsafe.merge.config import parse

    path = Path(path)
    parse(config, str(path))
    if path.is_dir():
        raise VlsafeError(f"{path}: is a directory (--emit-merge takes a .yaml file path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# vlsafe merge {path.name} --out DIR"] + [f"# {line}" for line in comment.splitlines() if line]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
