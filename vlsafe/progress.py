"""Progress of a long loop (training steps, evaluation items) on stderr.

On a terminal it is a rich bar. Elsewhere (a log file, `nohup`, a batch job on a cluster) a bar draws nothing, and a
stage that runs for an hour would say nothing for an hour: there it is a plain line at most every LINE_EVERY_S
seconds, and one when the loop ends if any was printed before (a loop shorter than that stays silent).

    with Steps("stage1", total=600, completed=resumed_at) as bar:
        ...
        bar.update(step, info="loss 1.2345")

Inside `with scope("stage2-s0"):` (the study, around each of its stages) every loop is named after that stage too:
`stage2-s0 (full): 7/40 steps, ...`, not only after the kind of work (`full`, `generate`) that a stage runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

LINE_EVERY_S = 60.0
_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlsafe_progress_scope", default=None)


@contextlib.contextmanager
def scope(name: str):
    """Names every `Steps` inside after `name` as well (a study stage around the training or evaluation it runs)."""
    token = _SCOPE.set(name)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def clock(seconds: float) -> str:
    """h:mm:ss from an hour on, else m:ss."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Steps:
    """`completed` of `total` `unit`; `enabled=False` shows nothing (another process's loop, a caller that asked
    for quiet)."""

    def __init__(self, name: str, total: int, completed: int = 0, unit: str = "steps", enabled: bool = True):
        from rich.console import Console

        outer = _SCOPE.get()
        name = f"{outer} ({name})" if outer and outer != name else name
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.completed = self.first = completed
        self.console = Console(stderr=True)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(name, total=total, completed=completed, info="")
        self.began = self.last = time.monotonic()
        self.printed, self.reported, self.info = False, None, ""

    def __enter__(self) -> Steps:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.printed and exc[0] is None and self.completed != self.reported:
            self._line()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.update(self.completed + n, info)

    def update(self, completed: int, info: str | None = None) -> None:
        self.completed = completed
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=self.info)
        elif self.enabled and completed != self.reported and (time.monotonic() - self.last >= LINE_EVERY_S
                                                              or (self.printed and completed >= self.total)):
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        elapsed, done = now - self.began, self.completed - self.first
        eta = f", ETA {clock(elapsed / done * (self.total - self.completed))}" if 0 < done and \
            self.completed < self.total else ""
        print(f"      {self.name}: {self.completed}/{self.total} {self.unit}, {clock(elapsed)}{eta}"
              f"{'  ' + self.info if self.info else ''}", file=sys.stderr, flush=True)
        self.last, self.printed, self.reported = now, True, self.completed
