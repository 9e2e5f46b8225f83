"""The merge config: mergekit's YAML schema (the `models:` form) plus vlsafe's extensions, validated once.

mergekit fields: `models` (each with `parameters`), `base_model`, `merge_method`, `parameters`, `dtype`,
`out_dtype`, `tokenizer_source` (only the base's tokenizer is supported). A parameter value is a scalar, a list
of scalars (a gradient interpolated over the language model's layers), a `{filter, value}` mapping, or a list of
those (the first whose filter is a substring of the tensor name wins; no filter or "*" matches every tensor).

vlsafe extensions:
- `scope`: which parts are merged: language_model, projector, tower (default: language_model and projector; the
  rest is copied from the base model).
- `layers`: rules over half-open decoder-layer ranges [start, end) (mergekit's `layer_range` convention). A rule
  either copies those layers verbatim from one model (`source`, any model with the same architecture, listed in
  `models` or not) or overrides parameters there (`parameters`, which outrank per-model and global values).
- `seed`: seeds the random masks of the DARE methods.
- `vocab`: what to do when the inputs' vocabularies differ (embed_tokens / lm_head rows). `error` (default): stop.
  `common`: merge the rows every input has (the first min(V)) and take the remaining rows from the base model,
  whose tokenizer the output keeps (the usual case: a VLM that added an <image> token, merged with its LLM). An
  input with more rows than the base is still an error. The manifest records each such tensor's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlsafe.errors import VlsafeError
from vlsafe.merge.registry import METHODS, Method, Param

Scalar = Union[bool, int, float, str]


class ConditionalValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: Optional[str] = None


Setting = Union[ConditionalValue, list[ConditionalValue], Scalar, list[Scalar]]
Settings = dict[str, Setting]

COMPONENTS = ("language_model", "projector", "tower")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[Settings] = None


class LayerRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_range: tuple[int, int]
    source: Optional[str] = None
    parameters: Optional[Settings] = None

    @model_validator(mode="after")
    def _one_action(self):
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(self.layer_range)} must be [start, end) with 0 <= start < end")
        if (self.source is None) == (self.parameters is None):
            raise ValueError("a layer rule takes exactly one of 'source' (copy layers) or 'parameters'")
        return self

    def covers(self, layer: int) -> bool:
        return self.layer_range[0] <= layer < self.layer_range[1]


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Optional[Settings] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    scope: list[Literal["language_model", "projector", "tower"]] = ["language_model", "projector"]
    layers: list[LayerRule] = []
    seed: int = 0
    vocab: Literal["error", "common"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _unsupported_forms(cls, data: Any):
        if isinstance(data, dict):
            for key in ("slices", "modules"):
                if key in data:
                    raise ValueError(f"mergekit's '{key}' form is not supported: list 'models' and select layers "
                                     "with 'layers' rules")
            for key in ("tokenizer", "chat_template"):
                if data.get(key) is not None:
                    raise ValueError(f"'{key}' is not supported: the base model's tokenizer and chat template are "
                                     "copied unchanged")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        method = METHODS.get(self.merge_method)
        if method is None:
            raise ValueError(f"unknown merge_method {self.merge_method!r} (known: {', '.join(METHODS)})")
        for name in ("dtype", "out_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} {value!r} is not a floating-point dtype (known: {', '.join(DTYPES)})")
        refs = [entry.model for entry in self.models]
        if len(set(refs)) != len(refs):
            raise ValueError("a model is listed twice in 'models'")
        others = [r for r in refs if r != self.base_model]
        if method.needs_base and self.base_model is None:
            raise ValueError(f"{method.name} needs a base_model")
        if method.needs_base and not others:
            raise ValueError(f"{method.name} needs at least one model besides the base_model")
        if method.max_inputs is not None and len(others) > method.max_inputs:
            raise ValueError(f"{method.name} takes exactly {method.max_inputs} model(s) besides the base_model, "
                             f"got {len(others)}")
        if not method.needs_base and self.base_model is not None and self.base_model not in refs:
            raise ValueError(f"{method.name} merges the listed models: base_model must be one of them or omitted")
        if self.tokenizer_source not in (None, "base", self.base_model):
            raise ValueError("tokenizer_source: only the base model's tokenizer is supported ('base')")
        if not self.scope:
            raise ValueError("scope is empty: nothing would be merged")
        # global parameters set per-model values for every model too (mergekit's precedence: model, then global)
        _check_settings(method, self.parameters, "parameters", per_model=False)
        for entry in self.models:
            _check_settings(method, entry.parameters, f"models[{entry.model}].parameters", per_model=True)
        for i, rule in enumerate(self.layers):
            _check_settings(method, rule.parameters, f"layers[{i}].parameters", per_model=False)
            for j, other in enumerate(self.layers[:i]):
                if rule.layer_range[0] < other.layer_range[1] and other.layer_range[0] < rule.layer_range[1]:
                    raise ValueError(f"layers[{i}] overlaps layers[{j}]")
        return self

    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    @property
    def layout_model(self) -> str:
        """The model whose tensor names, config and tokenizer the output takes."""
        return self.base_model or self.models[0].model

    def rule_for(self, layer: Optional[int]) -> Optional[LayerRule]:
        if layer is None:
            return None
        return next((rule for rule in self.layers if rule.covers(layer)), None)


def _leaves(setting: Setting):
    """Every scalar a setting can evaluate to, or interpolate between."""
    if isinstance(setting, ConditionalValue):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def _check_settings(method: Method, settings: Optional[Settings], where: str, per_model: bool) -> None:
    """Unknown names and out-of-range values fail here, before any tensor is read. A range is an interval, so
    checking a gradient's endpoints covers every value interpolated between them. A model's own parameters take
    only per-model values; global and layer-rule parameters take both kinds."""
    allowed = method.per_model if per_model else method.per_model + method.shared
    for name, setting in (settings or {}).items():
        param = method.param(name)
        if param is None or param not in allowed:
            names = ", ".join(p.name for p in allowed) or "none"
            raise ValueError(f"{where}: {method.name} takes no parameter {name!r} here (takes: {names})")
        for leaf in _leaves(setting):
            value = coerce(param, leaf, where)
            if param.check is not None and not param.check(value):
                raise ValueError(f"{where}: {name}={leaf!r} is out of range (must be {param.expected})")


def coerce(param: Param, value: Any, where: str) -> Any:
    if param.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {param.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: {param.name} must be a number, got {value!r}")
    try:
        return float(value)  # YAML reads 1e-3 as a string; mergekit accepts it as a number, so do we
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {param.name} must be a number, got {value!r}") from None


def evaluate(setting: Setting, names: tuple[str, ...], t: float) -> Any:
    """The value of a setting for a tensor known by `names` at depth t in [0, 1] (mergekit's rules): None when no
    filter matches. A numeric list interpolates linearly between its two nearest entries; other lists pick one."""
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(item, ConditionalValue) for item in setting):
        for cond in setting:
            if cond.filter in (None, "*") or any(cond.filter in name for name in names):
                return evaluate(cond.value, names, t)
        return None
    if not all(isinstance(item, (int, float, str)) and not isinstance(item, bool) for item in setting):
        return setting[int(t * (len(setting) - 1))]
    values = [float(item) for item in setting]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def load(path: str | Path) -> MergeConfig:
    """Reads and validates a merge YAML; any fault is one VlsafeError line naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: merge config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise VlsafeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse(data, str(path))


def parse(data: Any, origin: str) -> MergeConfig:
    if not isinstance(data, dict):
        raise VlsafeError(f"{origin}: a merge config is a mapping (merge_method, models, ...)")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise VlsafeError(f"{origin}: {loc + ': ' if loc else ''}{message}") from None


def dump(config: MergeConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
