"""Safety-tuning data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json

safety_app = typer.Typer(help="Safety-tuning data: align data, a VLGuard-like set, on-policy DPO pairs, leakage.",
                         no_args_is_help=True)
app.add_typer(safety_app, name="safety")


@safety_app.command("align-data")
def safety_align_data(model: str = typer.Option(..., help="The text LLM to align (its own answers are generated)."),
                      out: Path = typer.Option(..., help="A new directory: align.jsonl + manifest.json."),
                      n_harmful: int = typer.Option(160, help="Harmful prompts (AdvBench + Do-Not-Answer)."),
                      max_new_tokens: int = typer.Option(80, help="Length of the model's own benign answers."),
                      temperature: float = typer.Option(0.0, help="0 = greedy answers; > 0 samples them."),
                      seed: int = typer.Option(0),
                      cache: Optional[Path] = typer.Option(None, help="Generation cache (default: VLSAFE_CACHE).")):
    """Data for stage `align`: composed refusals for harmful prompts, the model's own answers for benign ones."""
    from vlsafe.safety.align import build

    manifest = build(out, model, n_harmful=n_harmful, seed=seed, max_new_tokens=max_new_tokens,
                     cache_path=str(cache) if cache else None, temperature=temperature)
    echo_json({"out": str(out), **manifest["counts"], "refusal_verbatim_duplicates":
                manifest["refusal_verbatim_duplicates"]})


@safety_app.command("vlguard-like")
def safety_vlguard_like(corpus: Path = typer.Option(..., help="A corpus from `vlsafe data synth`."),
                        out: Path = typer.Option(..., help="A new directory: train.json (VLGuard format) + images/."),
                        n: int = typer.Option(200, help="Records per kind (safe image, harmful image)."),
                        seed: int = typer.Option(0)):
    """An offline VLGuard-like safety set for stages `safety-sft` and `mixed` (format: vlguard)."""
    from vlsafe.safety.vlguard_like import build

    echo_json({"out": str(out), **build(corpus, out, n=n, seed=seed)["counts"]})


@safety_app.command("pairs")
def safety_pairs(model: str = typer.Option(..., help="The model DPO will tune (VLM dir or LLM spec)."),
                 out: Path = typer.Option(..., help="A new directory: pairs.jsonl (format: jsonl) + manifest.json."),
                 n_harmful: int = typer.Option(100), n_benign: int = typer.Option(60),
                 max_new_tokens: int = typer.Option(64), seed: int = typer.Option(0),
                 images: Optional[Path] = typer.Option(None, help="A synth corpus: half the pairs get a picture."),
                 cache: Optional[Path] = typer.Option(None, help="Generation cache (default: VLSAFE_CACHE).")):
    """On-policy DPO pairs: refusal over the model's own compliance; its own answer over a refusal."""
    from vlsafe.safety.pairs import build

    manifest = build(model, out, n_harmful=n_harmful, n_benign=n_benign, seed=seed, max_new_tokens=max_new_tokens,
                     images=images, cache_path=str(cache) if cache else None)
    echo_json({"out": str(out), **manifest["counts"]})


@safety_app.command("leakage")
def safety_leakage(path: str = typer.Argument(..., help="Training data to check."),
                   format_name: str = typer.Option("jsonl", "--format", help="Its format (jsonl, llava, vlguard, ...)."),
                   threshold: float = typer.Option(0.8, help="Near-duplicate word-set Jaccard."),
                   cosine: float = typer.Option(0.76, help="Same-meaning MiniLM cosine (chosen on labelled "
                                                           "paraphrase pairs; see vlsafe/safety/leakage.py)."),
                   words_only: bool = typer.Option(False, "--words-only", help="Skip the embedding check.")):
    """Exit 2 if any evaluation prompt (the evaluation sources of vlsafe/data/splits.yaml: HarmBench,
    StrongREJECT, over-refusal, helpfulness, held-out AdvBench and Do-Not-Answer) is in PATH, as a copy, a near
    copy (word overlap) or the same request in other words (MiniLM embeddings)."""
    from vlsafe.data import formats
    from vlsafe.safety import leakage

    echo_json(leakage.check(formats.load(format_name, path), threshold=threshold, where=path,
                            cosine=None if words_only else cosine))


@safety_app.command("copies")
def safety_copies(samples: Path = typer.Argument(..., help="samples.jsonl written by `vlsafe eval`."),
                  train: str = typer.Option(..., "--train", help="The safety training data the model was tuned on."),
                  format_name: str = typer.Option("jsonl", "--format", help="Its format (jsonl, llava, vlguard, ...)."),
                  judge: Optional[str] = typer.Option(None, help="Whose refusal verdicts (default: the first judge).")):
    """Share of the evaluation's refusals that copy a training response verbatim (memorisation, not alignment)."""
    from vlsafe.data import formats
    from vlsafe.safety import leakage

    training = leakage.training_responses(formats.load(format_name, train))
    echo_json(leakage.copies_in_samples(samples, training, judge=judge))
