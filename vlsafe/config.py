"""Configs: pydantic models loaded from YAML, with `key=value` overrides; validated once, saved with every output."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vlsafe.errors import VlsafeError

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


class BuildConfig(Strict):
    llm: str
    tower: str
    projector: str = "mlp2x_gelu"
    feature_layer: int | None = None  # None: the tower's own default (HF towers -2, EfficientNet-Lite0 its head)
    select_strategy: str | None = None
    seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=3` sets data['a']['b'] = 3; values are parsed as YAML scalars/lists (`x=[1,2]`, `y=null`)."""
    for item in overrides:
        if "=" not in item:
            raise VlsafeError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlsafeError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise VlsafeError(f"{path}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise VlsafeError(f"{path}: a config must be a mapping of keys to values")
    return data


def validate(cls: type[T], data: dict, where: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise VlsafeError(f"{where}: field {field!r}: {first['msg']}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), **defaults) -> T:
    data = {**defaults, **(read_yaml(path) if path else {})}
    return validate(cls, apply_overrides(data, list(overrides)), str(path or "config"))


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
