"""From a validated config and the inputs' safetensors headers to one step per output tensor.

Everything that can be wrong with the inputs is found here, before a byte is written: a model that cannot be
found, a layout that cannot be read, a tensor with no counterpart, a shape or vocabulary mismatch (unless the
config says `vocab: common`), a missing parameter. The output takes the tensor names, config and tokenizer of the
base model (for linear without a base, the first model); every input tensor is either used or set aside for a
recorded reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vlsafe.errors import VlsafeError
from vlsafe.io import verify_model_dir
from vlsafe.merge import layout as layouts
from vlsafe.merge.config import DTYPES, MergeConfig, coerce, evaluate
from vlsafe.merge.shards import TensorInfo, read_index


@dataclass
class Input:
    ref: str
    path: Path
    tensors: dict[str, TensorInfo]
    layout: layouts.Layout
    canonical: dict[tuple[str, str], str]  # (component, canonical name) -> this input's key


@dataclass
class Step:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the output tensor
    action: str  # "merge" or "copy"
    sources: list[tuple[str, str]]  # (model ref, key); a merge with a base lists the base first
    layer: Optional[int] = None
    t: float = 0.0
    per_input: list[dict[str, Any]] = field(default_factory=list)  # for the merged (non-base) sources
    shared: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    rows: Optional[int] = None  # vocab: common: merge rows [0, rows); the rest are the output layout model's


@dataclass
class Plan:
    config: MergeConfig
    inputs: dict[str, Input]
    steps: list[Step]
    unused: dict[str, dict[str, int]]  # model ref -> reason -> count of input tensors not used
    compute_dtype: Optional[torch.dtype]
    num_layers: int


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return getattr(torch, DTYPES[name]) if name else None


def resolve_model(ref: str, config_dir: Optional[Path]) -> Path:
    """A local directory (relative to the working directory as in mergekit, else to the config's folder), or a
    hub id already in the local HF cache; never a download."""
    candidates = [Path(ref).expanduser()]
    if config_dir is not None and not Path(ref).is_absolute():
        candidates.append(config_dir / ref)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
        if candidate.exists():
            raise VlsafeError(f"model {ref!r}: {candidate} is a file; a model is a checkpoint directory "
                              "(safetensors + config.json)")
    if "+" in ref:
        raise VlsafeError(f"model {ref!r}: LoRA references (model+lora) are not supported; merge the adapter first")
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache", said once below
            pass
    raise VlsafeError(f"model {ref!r} not found: not a directory and not in the local HF cache")


def load_input(ref: str, config_dir: Optional[Path]) -> Input:
    path = resolve_model(ref, config_dir)
    verify_model_dir(path)  # whole weight files matching their recorded content hash, before any tensor is read
    tensors = read_index(path)
    layout = layouts.detect(tensors, f"model {ref!r} ({path})")
    canonical = {}
    for key in tensors:
        canonical[layout.to_canonical(key)] = key
    return Input(ref, path, tensors, layout, canonical)


def _refs(config: MergeConfig) -> list[str]:
    refs = [config.layout_model] + [entry.model for entry in config.models]
    refs += [rule.source for rule in config.layers if rule.source]
    return list(dict.fromkeys(refs))


def build(config: MergeConfig, config_dir: Optional[Path] = None) -> Plan:
    inputs = {ref: load_input(ref, config_dir) for ref in _refs(config)}
    out = inputs[config.layout_model]
    layers = {layouts.layer_of(*out.layout.to_canonical(k)) for k in out.tensors} - {None}
    num_layers = max(layers) + 1 if layers else 0
    for i, rule in enumerate(config.layers):
        if rule.layer_range[1] > num_layers:
            raise VlsafeError(f"layers[{i}].layer_range {list(rule.layer_range)} goes past the {num_layers} layers "
                              f"of {config.layout_model!r}")
    builder = _Builder(config, inputs, num_layers)
    steps = [builder.step(key) for key in sorted(out.tensors)]
    return Plan(config, inputs, steps, builder.unused(), torch_dtype(config.dtype), num_layers)


class _Builder:
    def __init__(self, config: MergeConfig, inputs: dict[str, Input], num_layers: int):
        self.config, self.inputs, self.num_layers = config, inputs, num_layers
        self.out = inputs[config.layout_model]
        self.method = config.method
        self.used: dict[str, set[str]] = defaultdict(set)
        self.entries = {entry.model: entry for entry in config.models}
        self.out_dtype = torch_dtype(config.out_dtype or config.dtype)

    def _dtype(self, info: TensorInfo) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None and info.dtype.is_floating_point else info.dtype

    def _counterpart(self, ref: str, component: str, canonical: str, key: str) -> str:
        """The key of `ref` matching output tensor `key`; a missing or differently shaped one is an error."""
        source = self.inputs[ref]
        other = source.canonical.get((component, canonical))
        want = self.out.tensors[key].shape
        if other is None:
            hint = " (tied embeddings? one model stores lm_head, the other does not)" if "lm_head" in key else ""
            raise VlsafeError(f"model {ref!r} has no tensor matching {key!r} of {self.config.layout_model!r}{hint}")
        got = source.tensors[other].shape
        if got != want:
            if layouts.is_vocab(component, canonical) and got[1:] == want[1:]:
                where = (f"{key!r} has {want[0]} rows in {self.config.layout_model!r} but {got[0]} in {ref!r} "
                         f"({other!r})")
                if self.config.vocab == "error":
                    raise VlsafeError(f"vocabulary sizes differ: {where}; the models must share a tokenizer, or set "
                                      "`vocab: common` to merge the shared rows and take the rest from the base")
                if got[0] > want[0]:
                    raise VlsafeError(f"vocab: common takes the extra rows from {self.config.layout_model!r}, which "
                                      f"lacks some: {where}; make the model with the larger vocabulary the base")
                self.used[ref].add(other)
                return other
            raise VlsafeError(f"shape mismatch for {key!r}: {list(want)} in {self.config.layout_model!r} but "
                              f"{list(got)} in {ref!r} ({other!r}); the architectures differ")
        self.used[ref].add(other)
        return other

    def _copy(self, key: str, ref: str, source_key: str, note: str) -> Step:
        self.used[ref].add(source_key)
        info = self.inputs[ref].tensors[source_key]
        return Step(key, info.shape, self._dtype(self.out.tensors[key]), "copy", [(ref, source_key)], note=note)

    def step(self, key: str) -> Step:
        component, canonical = self.out.layout.to_canonical(key)
        info = self.out.tensors[key]
        layer = layouts.layer_of(component, canonical)
        base = self.config.layout_model
        if component not in self.config.scope:
            return self._copy(key, base, key, f"copied from {base} ({component} not in scope)")
        if not info.dtype.is_floating_point:
            return self._copy(key, base, key, f"copied from {base} (not floating point)")
        rule = self.config.rule_for(layer)
        if rule is not None and rule.source is not None:
            other = self._counterpart(rule.source, component, canonical, key)
            start, end = rule.layer_range
            return self._copy(key, rule.source, other, f"copied from {rule.source} (layers [{start}, {end}) rule)")

        needs_base = self.method.needs_base
        refs = [entry.model for entry in self.config.models if not (needs_base and entry.model == base)]
        absent = [ref for ref in refs if component not in self.inputs[ref].layout.components]
        refs = [ref for ref in refs if ref not in absent]
        absent_note = f"; {', '.join(absent)} has no {component}" if absent else ""
        if not refs:
            return self._copy(key, base, key, f"copied from {base} (no other model has a {component}{absent_note})")
        sources = [(base, key)] if needs_base else []
        if needs_base:
            self.used[base].add(key)
        sources += [(ref, self._counterpart(ref, component, canonical, key)) for ref in refs]
        rows = min(self.inputs[ref].tensors[k].shape[0] for ref, k in sources)
        rows = rows if rows < info.shape[0] else None  # the output layout model is always among the sources

        t = 0.0 if layer is None else (layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0)
        names = (key, canonical)
        rule_params = rule.parameters if rule is not None else None
        per_input = [{p.name: self._resolve(p, [rule_params, (self.entries[ref].parameters
                                                              if ref in self.entries else None),
                                                 self.config.parameters], names, t, f"{ref}: {key}")
                      for p in self.method.per_model} for ref in refs]
        shared = {p.name: self._resolve(p, [rule_params, self.config.parameters], names, t, key)
                  for p in self.method.shared}
        if self.method.name == "linear" and shared["normalize"] and sum(v["weight"] for v in per_input) == 0:
            raise VlsafeError(f"{key}: linear weights sum to zero, so they cannot be normalised")
        note = f"rule layers [{rule.layer_range[0]}, {rule.layer_range[1]})" if rule_params else ""
        if rows is not None:
            note += f"; vocab: common: rows [0, {rows}) merged, rows [{rows}, {info.shape[0]}) copied from {base}"
        return Step(key, info.shape, self._dtype(info), "merge", sources, layer, t, per_input, shared,
                    (note + absent_note).lstrip("; "), rows)

    def _resolve(self, param, scopes, names, t, where) -> Any:
        for settings in scopes:
            if settings and param.name in settings:
                value = evaluate(settings[param.name], names, t)
                if value is not None:
                    try:
                        return coerce(param, value, where)
                    except ValueError as err:
                        raise VlsafeError(str(err)) from None
        if param.required:
            raise VlsafeError(f"{where}: no value for parameter {param.name!r} of {self.method.name} "
                              "(no filter matched and there is no default)")
        return param.default

    def unused(self) -> dict[str, dict[str, int]]:
        """Why each input tensor that went into no output tensor was set aside; anything else is an error."""
        report: dict[str, dict[str, int]] = {}
        in_models = set(self.entries) | {self.config.layout_model}
        for ref, source in self.inputs.items():
            reasons: dict[str, int] = defaultdict(int)
            for key in sorted(set(source.tensors) - self.used[ref]):
                component, canonical = source.layout.to_canonical(key)
                layer = layouts.layer_of(component, canonical)
                rule = self.config.rule_for(layer)
                if component not in self.config.scope:
                    reasons[f"{component} not in scope"] += 1
                elif component not in self.out.layout.components:
                    reasons[f"the output ({self.out.layout.name}) has no {component}"] += 1
                elif rule is not None and rule.source is not None and rule.source != ref:
                    reasons[f"layer {layer} taken from {rule.source}"] += 1
                elif ref not in in_models:
                    reasons["outside the layers taken from this model"] += 1
                elif not source.tensors[key].dtype.is_floating_point:
                    reasons["not floating point (copied from the base)"] += 1
                else:
                    raise VlsafeError(f"model {ref!r}: tensor {key!r} has no counterpart in "
                                      f"{self.config.layout_model!r} (different architecture or layer count?)")
            if reasons:
                report[ref] = dict(reasons)
        return report
