"""One result row of results.json (`results[]` in eval/RESULTS.md) as a typed model, built and read in one place.

`vlsafe eval` builds every row through `ResultRow` (so a row it writes always has every field with its type) and
readers (`vlsafe eval compare`) validate rows with `read_rows`, so a hand-edited or truncated results.json fails
with one line naming the file, the row and the field instead of a KeyError deep in a table. The JSON on disk is
what RESULTS.md documents: `as_json` gives exactly its fields, in its order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, \
    model_validator

from vlsafe.errors import VlsafeError

Interval = Optional[tuple[float, float]]


class ResultRow(BaseModel):
    """One (benchmark, condition, category, metric, judge) cell; `value` is k / n, null with a `reason` when the
    judge cannot tell."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict: a results.json with "n": "40" or "higher_is_better": "yes" is malformed, not silently converted
    benchmark: StrictStr
    condition: StrictStr
    category: StrictStr
    metric: StrictStr  # a name in the metric table (benchmarks.yaml `metrics`, benchmarks.METRICS)
    judge: StrictStr
    judge_version: StrictStr
    n: StrictInt
    k: Optional[StrictInt]
    value: Optional[float]
    ci: Interval
    ci_wilson: Interval
    higher_is_better: StrictBool
    reason: Optional[StrictStr]

    @field_validator("n")
    @classmethod
    def _count(cls, n: int) -> int:
        if n < 0:
            raise ValueError("must be >= 0")
        return n

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        from vlsafe.eval.benchmarks import METRICS

        if metric not in METRICS:
            raise ValueError(f"{metric!r} is not a metric ({', '.join(METRICS)})")
        return metric

    @model_validator(mode="after")
    def _consistent(self) -> "ResultRow":
        if self.k is not None and not 0 <= self.k <= self.n:
            raise ValueError(f"k={self.k} is not within 0..n={self.n}")
        if self.value is not None and not 0.0 <= self.value <= 1.0:
            raise ValueError(f"value {self.value} is not a rate in [0, 1]")
        if self.value is None and self.n and self.reason is None:
            raise ValueError("value is null without a reason")
        return self

    def as_json(self) -> dict:
        """The row as results.json holds it (intervals as lists)."""
        out = self.model_dump()
        for key in ("ci", "ci_wilson"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


def read_rows(rows, where: str | Path) -> list[ResultRow]:
    """results.json's `results` list as typed rows; a malformed row raises one line naming `where`, the row index
    and the field."""
    if not isinstance(rows, list):
        raise VlsafeError(f"{where}: field 'results' is not a list of result rows")
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(ResultRow.model_validate(row))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(row)"
            raise VlsafeError(f"{where}: results[{index}]: field {field!r}: {first['msg']}") from None
    return out
