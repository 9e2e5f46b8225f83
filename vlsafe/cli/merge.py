"""Merging and merge sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import DefaultRunGroup, app, echo_json

merge_app = typer.Typer(cls=DefaultRunGroup, no_args_is_help=True,
                        help="Merge weights (mergekit-style YAML; VLM-aware): `vlsafe merge CONFIG.yaml --out DIR`.")
app.add_typer(merge_app, name="merge")


@merge_app.command("run", hidden=True)
def merge_run(config: Path = typer.Argument(..., help="mergekit-style merge YAML"),
              out: Path = typer.Option(..., "--out", help="output directory (must not exist)"),
              shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard, e.g. 5GB")) -> None:
    """Merge the models of CONFIG into OUT (weights, manifest, model card, base config and tokenizer)."""
    from vlsafe.merge.engine import merge

    echo_json(merge(config, out, shard_size=shard_size))


@merge_app.command("sweep")
def merge_sweep(sweep: Path = typer.Argument(..., help="sweep YAML: config, grid of dotted paths, optional eval"),
                out: Path = typer.Option(..., "--out", help="output directory (must not exist)"),
                shard_size: str = typer.Option("5GB", "--shard-size"),
                keep_models: bool = typer.Option(True, "--keep-models/--delete-models",
                                                 help="keep each merged model, or delete it once evaluated (disk)"),
                cache: Optional[Path] = typer.Option(None, "--cache", help="evaluation cache (default "
                                                     "$VLSAFE_CACHE/eval.sqlite)")) -> None:
    """One merged model per grid point, each evaluated with the sweep's suite; sweep.json, pareto.json, pareto.png."""
    from vlsafe.merge.sweep import sweep as run_sweep

    echo_json(run_sweep(sweep, out, shard_size=shard_size, keep_models=keep_models, cache=cache,
                        log=lambda message: typer.echo(message, err=True)))
