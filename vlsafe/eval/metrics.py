"""Rates with honest uncertainty: every rate comes with its n and a 95% Wilson interval."""

from __future__ import annotations

import math


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (sensible at 0, 1 and small n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(flags: list[bool]) -> dict:
    k, n = sum(bool(f) for f in flags), len(flags)
    low, high = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": [low, high]}


def agreement(a: list[bool], b: list[bool]) -> dict:
    if len(a) != len(b):
        raise ValueError("agreement needs two label lists of the same length")
    return rate([x == y for x, y in zip(a, b)])


def answer_correct(response: str, answer: str | None, aliases: list[str] = ()) -> bool:
    """Normalised containment of the answer or an accepted alias as a whole word/number (case, punctuation and
    spacing ignored), so "Forty-two!" matches "forty-two" but "142" does not match "42"."""
    import re

    text = " " + re.sub(r"[^a-z0-9.\- ]+", " ", response.lower()) + " "
    for expected in [answer or "", *aliases]:
        expected = re.sub(r"[^a-z0-9.\- ]+", " ", expected.lower()).strip()
        if expected and re.search(rf"(?<![a-z0-9]){re.escape(expected)}(?![a-z0-9])", text):
            return True
    return False
