"""Datasets: inspect published formats, write the built-in corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json

data_app = typer.Typer(help="Datasets: the built-in corpus, and the external formats converted into vlsafe records.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(path: str = typer.Argument(..., help="A file or folder in the format's published layout."),
                 format_name: str = typer.Option(..., "--format", help="Format name (see vlsafe.data.formats)."),
                 image_root: Optional[Path] = typer.Option(None, "--image-root",
                                                           help="Where images resolve (default: the file's folder)."),
                 ) -> None:
    """Validate every record of PATH and print a JSON summary: "records" (count), labels, categories."""
    from vlsafe.data import formats

    echo_json(formats.inspect(path, format_name, image_root=image_root))


@data_app.command("synth")
def data_synth(out: Path = typer.Option(..., "--out", help="A new (or empty) directory for the corpus."),
               n: int = typer.Option(2000, "--n", help="Training images, each with a caption and a conversation."),
               seed: int = typer.Option(0, "--seed", help="The same seed writes the same bytes."),
               ) -> None:
    """Write the built-in benign image-text corpus: stage-1 captions, stage-2 conversations, held-out eval."""
    from rich.console import Console
    from rich.progress import Progress

    from vlsafe.data.synthetic import write_corpus

    with Progress(console=Console(stderr=True), transient=True) as bar:  # stdout stays clean JSON
        task = bar.add_task("drawing images", total=None)
        manifest = write_corpus(out, n=n, seed=seed,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    echo_json({"out": str(out), "seed": seed, **manifest["counts"]})
