"""The study's progress line: which stage, how many are done, and an ETA from the cost model corrected by what
the finished stages actually took (training and evaluation stages show their own steps below it: vlsafe/progress.py).

The correction is the ratio of measured to estimated time over the finished stages, shrunk toward 1 by a prior
worth PRIOR_S seconds of estimate, so one short stage (a 20-second corpus) does not rescale hours of training."""

from __future__ import annotations

import time

from rich.console import Console

from vlsafe.progress import clock

PRIOR_S = 600.0


class StudyProgress:
    def __init__(self, stages: list, quiet: bool = False):
        self.total = len(stages)
        self.remaining = {s.name: s.cost_s for s in stages}
        self.estimated_done = 0.0
        self.actual_done = 0.0
        self.done = 0
        self.console = Console(stderr=True, quiet=quiet)
        self.began = time.time()

    def _eta(self) -> float:
        ratio = (self.actual_done + PRIOR_S) / (self.estimated_done + PRIOR_S)
        return sum(self.remaining.values()) * ratio

    def start(self, stage) -> None:
        self.console.print(f"[bold][{self.done + 1}/{self.total}][/bold] {stage.name} ({stage.kind}, est. "
                           f"{clock(stage.cost_s)}; study ETA {clock(self._eta())})")

    def skip(self, stage) -> None:
        self.remaining.pop(stage.name, None)
        self.done += 1

    def finish(self, stage, seconds: float) -> None:
        self.estimated_done += self.remaining.pop(stage.name, 0.0)
        self.actual_done += seconds
        self.done += 1
        self.console.print(f"      {stage.name} done in {clock(seconds)}")

    def summary(self, skipped: int) -> None:
        self.console.print(f"study: {self.done - skipped} stage(s) run, {skipped} reused, "
                           f"{clock(time.time() - self.began)} wall")

