"""Models: build a VLM, export it to HF Llava, lint a chat template, chat."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app
from vlsafe.errors import VlsafeError



@app.command()
def build(
    llm: str = typer.Option(..., help="LLM: a preset (see `vlsafe assets list`), 'pico', an HF dir, a .gguf file or a hub id."),
    tower: str = typer.Option(..., help="Vision tower: 'efficientnet-lite0', 'pico', or a CLIP/SigLIP HF dir or hub id."),
    out: Path = typer.Option(..., help="Output directory (must not exist)."),
    projector: str = typer.Option("mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1)."),
    feature_layer: Optional[int] = typer.Option(None, help="Tower layer whose features feed the projector "
                                                "(default: -2 for CLIP/SigLIP, the head -1 for efficientnet-lite0)."),
    select_strategy: Optional[str] = typer.Option(None, help="'default' drops CLIP's CLS token, 'full' keeps all."),
    seed: int = typer.Option(0, help="Seed for the projector's initialisation (and pico weights)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off unless you ask)."),
):
    """Compose a VLM (tower + projector + LLM, the LLaVA-1.5 recipe) and save it as an HF-style directory."""
    from vlsafe.config import BuildConfig, validate
    from vlsafe.model import checkpoint

    config = validate(BuildConfig, dict(llm=llm, tower=tower, projector=projector, feature_layer=feature_layer,
                                        select_strategy=select_strategy, seed=seed, dtype=dtype,
                                        trust_remote_code=trust_remote_code), "build")
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    bundle = checkpoint.build_vlm(**{**config.model_dump(), "dtype": checkpoint.parse_dtype(dtype)})
    checkpoint.save(bundle, out, provenance={"command": "build", **config.model_dump()})
    vlm = bundle.model.config
    typer.echo(f"wrote {out}: {vlm.num_image_tokens} image tokens of {vlm.vision_hidden_size} -> "
               f"{vlm.text_config.hidden_size}, {sum(p.numel() for p in bundle.model.parameters()):,} parameters")


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
