"""Training vs evaluation prompt pools, as declared in splits.yaml (the one place that says which source does what).

A training source may keep a held-out part for evaluation: an item is held out by a salted hash of its id, so the
split needs no stored list, ignores file order, and a builder cannot draw a held-out item by accident: every
training builder takes its prompts through `training_part`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

SPLITS_FILE = Path(__file__).with_name("splits.yaml")


@functools.cache
def declared() -> dict:
    import yaml

    spec = yaml.safe_load(SPLITS_FILE.read_text(encoding="utf-8"))
    for key in ("training", "evaluation", "salt"):
        if key not in spec:
            raise VlsafeError(f"{SPLITS_FILE}: missing field {key!r}")
    overlap = set(spec["training"]) & set(spec["evaluation"])
    if overlap:
        raise VlsafeError(f"{SPLITS_FILE}: {sorted(overlap)} declared both for training and for evaluation")
    return spec


def _share(source: str) -> float:
    training = declared()["training"]
    if source not in training:
        raise VlsafeError(f"{SPLITS_FILE}: {source!r} is not a training source (known: {', '.join(training)})")
    return float((training[source] or {}).get("heldout_share", 0.0))


def is_heldout(source: str, item_id: str) -> bool:
    digest = hashlib.sha256(f"{declared()['salt']}{item_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 16 ** 8 < _share(source)


def training_part(source: str, prompts: list[Prompt]) -> list[Prompt]:
    """The prompts of training source `source` that training may use (its held-out part removed)."""
    _share(source)  # an undeclared source is an error even with no prompts
    return [p for p in prompts if not is_heldout(source, p.id)]


def heldout_part(source: str, prompts: list[Prompt]) -> list[Prompt]:
    """The prompts of training source `source` kept for evaluation only."""
    if _share(source) <= 0:
        raise VlsafeError(f"{SPLITS_FILE}: training source {source!r} holds nothing out (heldout_share 0)")
    return [p for p in prompts if is_heldout(source, p.id)]


def evaluation_names() -> list[str]:
    """The benchmarks that evaluate, in declared order: training data must hold none of their prompts."""
    return list(declared()["evaluation"])
