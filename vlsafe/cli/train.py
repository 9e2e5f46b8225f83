"""Training: one engine for every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json


@app.command()
def train(config: Path = typer.Argument(..., help="Training YAML (see configs/train/)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="key=value settings over the YAML, e.g. lr=1e-4"),
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Train a stage (align | projector | full | safety-sft | mixed | dpo); rerun the same to resume."""
    from vlsafe.resources import check_training_fits
    from vlsafe.train.config import load_train_config
    from vlsafe.train.engine import train as run_train

    train_config = load_train_config(config, overrides or [])
    check_training_fits(train_config)  # refuse before loading, not an OOM kill hours later
    summary = run_train(train_config, show_progress=not no_progress)
    if summary.pop("is_main", True):  # under `accelerate launch`, one summary, not one per process
        echo_json(summary)
