"""Layer analysis: weight deltas and task-vector cosines, activation safety layers and refusal directions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlsafe.cli._app import app
from vlsafe.errors import VlsafeError

analyze_app = typer.Typer(no_args_is_help=True,
                          help="Where training moved the weights and where safety lives: `vlsafe analyze weights | "
                               "activations | tower ... --out DIR` (DIR/analysis.json, PNG figures).")
app.add_typer(analyze_app, name="analyze")


def _summary(result: dict, out: Path) -> None:
    typer.echo(f"wrote {out}/analysis.json ({', '.join(result['figures'])})")
    if "emitted_merge" in result:
        typer.echo(f"wrote {result['emitted_merge']['path']} (run: vlsafe merge {result['emitted_merge']['path']} "
                   "--out DIR)")


# `--models B C D`: click options take one value each, so the values after the first arrive as extra arguments
@analyze_app.command("weights", context_settings={"allow_extra_args": True})
def analyze_weights(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="The base checkpoint directory (the start of the chain)."),
    models: List[str] = typer.Option(..., "--models", help="Checkpoint directories, in chain order "
                                     "(e.g. aligned, adapted, safety-tuned); repeat or list after one --models."),
    out: Path = typer.Option(..., "--out", help="Output directory (must not exist)."),
    name: Optional[List[str]] = typer.Option(None, "--name", help="A name per model, base first (default: the "
                                             "directory names)."),
    pair: Optional[List[str]] = typer.Option(None, "--pair", help="Two task vectors to compare, 'X-Y,Z-W' in model "
                                             "names (default: consecutive updates of the chain)."),
    emit_merge: Optional[Path] = typer.Option(None, "--emit-merge", help="Also write a merge YAML: the second update "
                                              "of the first pair, applied where the updates' cosine is below "
                                              "--gate-threshold."),
    gate_threshold: float = typer.Option(0.0, "--gate-threshold", help="Layers whose cosine is below this are merged."),
    gate_weight: float = typer.Option(1.0, "--gate-weight", help="The weight of the update in those layers."),
) -> None:
    """Relative change ||dW||/||W|| per layer and module of every model against the base; cosine and TIES
    sign-conflict rate of task-vector pairs per layer."""
    from vlsafe.analysis.weights import analyze

    models = [*models, *ctx.args]
    pairs = None
    if pair:
        pairs = []
        for text in pair:
            parts = text.split(",")
            if len(parts) != 2:
                raise VlsafeError(f"--pair {text!r}: expected two task vectors 'X-Y,Z-W'")
            pairs.append((parts[0].strip(), parts[1].strip()))
    result = analyze(base, models, out, names=name, pairs=pairs, emit_merge=emit_merge,
                     gate_threshold=gate_threshold, gate_weight=gate_weight)
    _summary(result, out)


@analyze_app.command("activations")
def analyze_activations(
    model: str = typer.Option(..., "--model", help="A VLM directory or any LLM spec."),
    out: Path = typer.Option(..., "--out", help="Output directory (must not exist)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The aligned model whose refusal direction the "
                                            "projections use and whose safety layers are located."),
    conditions: str = typer.Option("text", "--conditions", help="Comma-separated: text, blank, typo, natural "
                                   "(all but text need a VLM)."),
    n: int = typer.Option(64, "--n", help="Prompts per class (harmful, benign), seeded sample."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="A `vlsafe data synth` corpus: its held-out image "
                                          "questions join the benign prompts."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size"),
    emit_merge: Optional[Path] = typer.Option(None, "--emit-merge", help="Also write a merge YAML: --reference's "
                                              "weights in the safety layers, --model's elsewhere."),
) -> None:
    """Last-token hidden states per layer on harmful and benign prompts: pair cosines and the safety layers where
    their gap opens (Li et al. 2024), refusal directions and projections onto the reference's."""
    from vlsafe.analysis.activations import analyze

    wanted = [c.strip() for c in conditions.split(",") if c.strip()]
    result = analyze(model, out, reference=reference, conditions=wanted, n=n, corpus=corpus, seed=seed,
                     batch_size=batch_size, emit_merge=emit_merge)
    span = result["safety_layers"]
    typer.echo(f"safety layers: {span['start']}..{span['end']}" if span["start"] is not None
               else f"safety layers: none located ({span['reason']})")
    _summary(result, out)


@analyze_app.command("tower")
def analyze_tower(
    tower: str = typer.Option("efficientnet-lite0", "--tower", help="A tower spec, as for `vlsafe build`."),
    layer: Optional[List[int]] = typer.Option(None, "--layer", help="A feature layer to probe (repeat to compare; "
                                              "default: the tower's own)."),
    n: int = typer.Option(400, "--n", help="Training scenes per question type (half as many test scenes)."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write OUT/analysis.json (a new directory)."),
) -> None:
    """Linear probes on the frozen tower: per layer and question type of the built-in corpus, the accuracy a
    ridge read-out of the visual tokens gets on fresh scenes, beside chance (the commonest answer)."""
    from vlsafe.analysis.tower import probe
    from vlsafe.cli._app import print_table

    result = probe(tower, layer or None, n=n, seed=seed, out=out)
    tasks = result["tasks"]
    print_table(f"{tower}: linear probes, {result['n_train']} training / {result['n_test']} test scenes per type",
                ["layer", "channels x tokens", *tasks, "mean"],
                [["chance", "", *(f"{result['chance'][t]:.2f}" for t in tasks), f"{result['chance_mean']:.2f}"]]
                + [[str(r["layer"]), f"{r['channels']} x {r['tokens']}",
                    *(f"{r['accuracy'][t]:.2f}" for t in tasks), f"{r['mean']:.2f}"] for r in result["layers"]])
    if out is not None:
        typer.echo(f"wrote {out}/analysis.json")
