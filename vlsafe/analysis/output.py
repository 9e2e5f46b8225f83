"""What every analysis.json shares: schema, version, provenance; and the matplotlib set-up of its figures."""

from __future__ import annotations

import time

SCHEMA, SCHEMA_VERSION = "vlsafe.analysis", 1


def header(kind: str) -> dict:
    from vlsafe.eval.run import git_hash
    from vlsafe.io import versions

    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": kind,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_hash(), "versions": versions()}


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rounded(value, digits: int = 6):
    return None if value is None else round(float(value), digits)
