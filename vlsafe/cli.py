"""The vlsafe command line. Each command parses its arguments, then calls one library function; no logic here.

Bad input raises `VlsafeError` anywhere below; `main` prints it on one line and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer

from vlsafe.errors import VlsafeError

app = typer.Typer(help="vlsafe: what VL adaptation does to an LLM's safety, and how to get it back.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _echo_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------------------------------------------------- assets
# (section: assets)
assets_app = typer.Typer(help="Offline assets: real models and data shipped inside PyPI wheels, pinned by sha256.",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0, overflow="fold")  # the first column is what users type
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@assets_app.command("list")
def assets_list(as_json: bool = typer.Option(False, "--json", help="Print the registry entries as JSON.")) -> None:
    """List the registered assets and whether their files are on this machine."""
    from vlsafe import assets

    entries = assets.list_assets()
    if as_json:
        _echo_json([{**a.model_dump(exclude={"sha256"}), "present": a.present()} for a in entries])
        return
    _print_table("vlsafe assets (details: --json)", ["name", "kind", "MB", "source", "here"],
                 [[a.name, a.kind, f"{a.size / 1e6:.1f}", a.source,
                   "yes" if a.present() else "no" if a.default else "optional"] for a in entries])


@assets_app.command("fetch")
def assets_fetch(name: Optional[str] = typer.Argument(None, help="One asset; default: every non-optional one.")) -> None:
    """Install or assemble what is missing, verify every file by sha256, and prepare LLMs in the cache."""
    from vlsafe import assets

    for asset_name, paths in assets.fetch(name).items():
        typer.echo(f"{asset_name}: {', '.join(str(p) for p in paths)}")


@assets_app.command("verify")
def assets_verify(name: Optional[str] = typer.Argument(None, help="One asset; default: all."),
                  as_json: bool = typer.Option(False, "--json", help="Print one result per file as JSON.")) -> None:
    """Check every asset file against its pinned sha256; exit status 2 if any is missing or differs."""
    from vlsafe import assets

    checks = assets.verify(name)
    if as_json:
        _echo_json([c.as_dict() for c in checks])
    else:
        _print_table("sha256", ["asset", "file", "status"],
                     [[c.asset, Path(c.path).name, c.status] for c in checks])
    assets.raise_for_failures(checks)


# ---------------------------------------------------------------------------------------------------------- model
# (section: model)


@app.command()
def build(
    llm: str = typer.Option(..., help="LLM: a preset (see `vlsafe assets list`), 'pico', an HF dir, a .gguf file or a hub id."),
    tower: str = typer.Option(..., help="Vision tower: 'efficientnet-lite0', 'pico', or a CLIP/SigLIP HF dir or hub id."),
    out: Path = typer.Option(..., help="Output directory (must not exist)."),
    projector: str = typer.Option("mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1)."),
    feature_layer: int = typer.Option(-2, help="Tower hidden layer whose features feed the projector (HF towers)."),
    select_strategy: Optional[str] = typer.Option(None, help="'default' drops CLIP's CLS token, 'full' keeps all."),
    seed: int = typer.Option(0, help="Seed for the projector's initialisation (and pico weights)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off unless you ask)."),
):
    """Compose a VLM (tower + projector + LLM, the LLaVA-1.5 recipe) and save it as an HF-style directory."""
    from vlsafe.model import checkpoint

    args = dict(llm=llm, tower=tower, projector=projector, feature_layer=feature_layer,
                select_strategy=select_strategy, seed=seed, dtype=dtype, trust_remote_code=trust_remote_code)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    bundle = checkpoint.build_vlm(**{**args, "dtype": checkpoint.parse_dtype(dtype)})
    checkpoint.save(bundle, out, provenance={"command": "build", **args})
    config = bundle.model.config
    typer.echo(f"wrote {out}: {config.num_image_tokens} image tokens of {config.vision_hidden_size} -> "
               f"{config.text_config.hidden_size}, {sum(p.numel() for p in bundle.model.parameters()):,} parameters")


@app.command("export-hf")
def export_hf(src: Path = typer.Argument(..., help="A vlsafe VLM directory with a CLIP/SigLIP tower."),
              out: Path = typer.Argument(..., help="Output directory for LlavaForConditionalGeneration.")):
    """Export a VLM to transformers' LlavaForConditionalGeneration (for vLLM, TRL, lmms-eval)."""
    from vlsafe.model.export import export_hf as run_export

    typer.echo(f"wrote {run_export(src, out)}")


@app.command("lint-template")
def lint_template(
    model: str = typer.Option(..., help="A VLM directory or any LLM spec."),
    data: Optional[Path] = typer.Option(None, help="LLaVA JSON or Conversation JSONL to lint (default: built-in cases)."),
    limit: int = typer.Option(200, help="Lint at most this many records of --data."),
    show: int = typer.Option(2, help="How many rendered samples to print with their label mask."),
):
    """Render samples through the chat template, show the label mask, fail if labels != assistant turns."""
    from rich.console import Console
    from rich.text import Text

    from vlsafe.model import checkpoint, lint

    bundle = checkpoint.load(model)
    fmt = bundle.formatter()
    if data is not None:
        conversations = lint.read_conversations(data)[:limit]
    else:
        image = None
        if bundle.is_vlm:
            import tempfile

            from PIL import Image

            image = str(Path(tempfile.mkdtemp(prefix="vlsafe-lint-")) / "square.png")
            Image.new("RGB", (64, 64), (220, 30, 30)).save(image)
        conversations = lint.builtin_samples(image)
    report = lint.lint(fmt, conversations, show=show)
    console = Console()
    for record_id, segments in report.shown:
        console.rule(f"{record_id}  (green = trained on)")
        text = Text()
        for piece, target in segments:
            text.append(piece, style="bold green" if target else "dim")
        console.print(text)
    for problem in report.problems:
        typer.echo(f"lint: {problem}", err=True)
    typer.echo(f"{report.checked} samples, {len(report.problems)} problems")
    if report.problems:
        raise typer.Exit(1)


@app.command()
def chat(
    model: str = typer.Option(..., help="A VLM directory or any LLM spec."),
    prompt: list[str] = typer.Option(..., help="A user message (repeat for several, generated as one batch)."),
    image: Optional[Path] = typer.Option(None, help="An image for every prompt (VLMs only)."),
    system: Optional[str] = typer.Option(None, help="A system prompt (default: the template's own)."),
    max_new_tokens: int = typer.Option(128),
):
    """Generate a reply (greedy) to one or more prompts."""
    from vlsafe.data.records import Prompt
    from vlsafe.eval.generate import Decoding, generate
    from vlsafe.model import checkpoint

    if image is not None and not image.is_file():
        raise VlsafeError(f"{image}: image not found")
    bundle = checkpoint.load(model)
    prompts = [Prompt(id=str(i), text=p, image=str(image) if image else None) for i, p in enumerate(prompt)]
    for p, reply in zip(prompt, generate(bundle, prompts, Decoding(max_new_tokens=max_new_tokens), system=system)):
        typer.echo(f"> {p}\n{reply}\n")

# ---------------------------------------------------------------------------------------------------------- data
# (section: data)

# ---------------------------------------------------------------------------------------------------------- merge
# (section: merge)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: returns the exit status (2 for bad input, with one line naming what is wrong)."""
    try:
        # without standalone mode, click returns the code of a typer.Exit instead of raising it
        status = app(args=argv, prog_name="vlsafe", standalone_mode=False)
    except VlsafeError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        return 2
    return status if isinstance(status, int) else 0


def run() -> None:
    sys.exit(main())
