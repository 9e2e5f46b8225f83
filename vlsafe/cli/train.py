"""Training: one engine for every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json


def _settings_help() -> str:
    """The config's fields and their help text, from TrainConfig itself (one place for code, --help and docs)."""
    from vlsafe.train.config import TrainConfig

    lines = [f"{name}: {field.description}" for name, field in TrainConfig.model_fields.items()
             if field.description and name != "provenance"]
    # typer (click) rewraps plain text: a blank line between entries keeps one setting per paragraph
    return "Settings (YAML keys, or key=value):\n\n" + "\n\n".join(lines)


@app.command(epilog=_settings_help())
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
