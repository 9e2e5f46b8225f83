"""Which checkpoint layout a set of tensor names is, and how each name maps to a canonical (component, name).

The knowledge is data (layouts.json); this module only reads it. Canonical language-model names are the plain HF
causal-LM ones, so a text LLM's `model.layers.3.mlp.up_proj.weight` lines up with a VLM's
`language_model.model.layers.3.mlp.up_proj.weight` or `model.language_model.layers.3.mlp.up_proj.weight`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from vlsafe.errors import VlsafeError

DATA = Path(__file__).with_name("layouts.json")


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    detect: tuple[str, ...]
    # (component, actual prefix, canonical prefix), longest actual prefix first so the most specific one wins
    prefixes: tuple[tuple[str, str, str], ...]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(component for component, _, _ in self.prefixes))

    def to_canonical(self, key: str) -> Optional[tuple[str, str]]:
        for component, actual, canonical in self.prefixes:
            if key.startswith(actual):
                return component, canonical + key[len(actual):]
        return None


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(DATA.read_text())


@lru_cache(maxsize=1)
def layouts() -> tuple[Layout, ...]:
    out = []
    for name, spec in _data()["layouts"].items():
        prefixes = [(component, actual, canonical) for component, mapping in spec["components"].items()
                    for actual, canonical in mapping.items()]
        prefixes.sort(key=lambda item: -len(item[1]))
        out.append(Layout(name, spec["description"], tuple(spec["detect"]), tuple(prefixes)))
    return tuple(out)


def layer_of(component: str, canonical: str) -> Optional[int]:
    """The decoder-layer index of a language-model tensor (None for embeddings, final norm, head, and anything
    outside the language model)."""
    if component != "language_model":
        return None
    match = re.match(_data()["canonical"]["layer"], canonical)
    return int(match.group(1)) if match else None


def is_vocab(component: str, canonical: str) -> bool:
    return component == "language_model" and canonical in _data()["canonical"]["vocab"]


def detect(keys: Iterable[str], where: str) -> Layout:
    keys = list(keys)
    fitting, near = [], []
    for layout in layouts():
        if not all(any(k.startswith(prefix) for k in keys) for prefix in layout.detect):
            continue
        stray = [k for k in keys if layout.to_canonical(k) is None]
        (near if stray else fitting).append((layout, stray))
    if len(fitting) == 1:
        return fitting[0][0]
    if len(fitting) > 1:
        raise VlsafeError(f"{where}: tensor names fit several layouts ({', '.join(l.name for l, _ in fitting)})")
    if near:
        layout, stray = near[0]
        raise VlsafeError(f"{where}: tensor {stray[0]!r} fits no component of layout {layout.name} "
                          f"({len(stray)} such tensors)")
    known = ", ".join(layout.name for layout in layouts())
    raise VlsafeError(f"{where}: tensor names fit no known layout (known: {known}; see vlsafe/merge/layouts.json)")
