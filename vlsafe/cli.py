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


class _DefaultRunGroup(typer.core.TyperGroup):
    """A group whose arguments go to its hidden `run` command unless they name a subcommand or ask for help:
    `vlsafe merge CONFIG --out DIR` next to `vlsafe merge sweep`, `vlsafe judge --input F` next to `judge train`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0, overflow="fold")  # the first column is what users type
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
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

# ---------------------------------------------------------------------------------------------------------- study


@app.command()
def study(
    out: Path = typer.Option(Path("runs/study"), help="Output directory (a new one; a timestamp is added if it exists)."),
    llm: str = typer.Option("smollm2-135m-instruct", help="The LLM to study."),
    tower: str = typer.Option("efficientnet-lite0", help="The vision tower to attach."),
    n_harmful: int = typer.Option(40, help="Harmful items per source (HarmBench test, StrongREJECT)."),
    n_benign: int = typer.Option(40, help="Benign-but-scary and helpfulness items each."),
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0),
):
    """The main job on the offline default: safety, over-refusal and helpfulness of the LLM and its VLM@0."""
    import time

    from vlsafe.study.baseline import BaselineConfig, run_baseline

    if out.exists():
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = BaselineConfig(llm=llm, tower=tower, n_harmful=n_harmful, n_benign=n_benign,
                            max_new_tokens=max_new_tokens, seed=seed)
    run_baseline(out, config, log=typer.echo)
    typer.echo(f"wrote {out}/results.json and {out}/samples.jsonl")


judge_app = typer.Typer(cls=_DefaultRunGroup, no_args_is_help=True,
                        help="Judge responses (`vlsafe judge --input F --judge NAME --output G`), or train judges.")
app.add_typer(judge_app, name="judge")


@judge_app.command("run", hidden=True)
def judge(
    input: Path = typer.Option(..., "--input", help="JSONL rows with 'prompt' and 'response'."),
    judge_name: str = typer.Option("default", "--judge",
                                   help="default | refusal-minilm | refusal-patterns | llm:TEMPLATE:BACKEND | DIR."),
    output: Path = typer.Option(..., "--output", help="JSONL out: the rows plus 'refused' and 'score'."),
):
    """Judge responses: adds `refused` (bool) and `score` to each row."""
    import json

    from vlsafe.eval.judges import judge_rows

    if not input.is_file():
        raise VlsafeError(f"{input}: file not found")
    if output.exists():
        raise VlsafeError(f"{output}: output path exists (choose a new one)")
    rows = []
    for n, line in enumerate(input.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise VlsafeError(f"{input}: line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(rows[-1], dict):
                raise VlsafeError(f"{input}: line {n}: not a JSON object")
    judged = judge_rows(rows, judge_name, where=str(input))
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in judged))
    tmp.replace(output)
    refused = sum(r["refused"] for r in judged)
    typer.echo(f"{len(judged)} rows judged by {judge_name}: {refused} refusals -> {output}")


@judge_app.command("train")
def judge_train(out: Optional[Path] = typer.Option(None, "--out", help="New directory (default: refresh the packaged "
                                                                      "classifier in vlsafe/eval/judge_data)."),
                seed: int = typer.Option(0, "--seed")) -> None:
    """Fit the learned refusal judges on the labelled data; write the classifier and a card of held-out accuracy."""
    from vlsafe.eval.judge_train import train as run_train

    run_train(out, seed=seed, log=typer.echo)


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="A VLM directory or any LLM spec (text condition only)."),
    suite: str = typer.Option(..., "--suite", help="quick | safety | overrefusal | helpfulness, or a suite .yaml."),
    out: Path = typer.Option(..., "--out", help="New directory for results.json and samples.jsonl."),
    judge_name: str = typer.Option("default", "--judge", help="Refusal judge (see `vlsafe judge`)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per benchmark."),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated subset, e.g. text,typo."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="A `vlsafe data synth` corpus (image questions)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite cache (default $VLSAFE_CACHE/eval.sqlite)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    backend: str = typer.Option("hf", "--backend", help="hf | vllm (HF-exported models, GPUs)."),
) -> None:
    """Evaluate a model on a suite: per benchmark and condition, rates with n and 95% CIs."""
    from vlsafe.eval.run import evaluate

    wanted = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    report = evaluate(model, suite, out, judge=judge_name, limit=limit, conditions=wanted, corpus=corpus,
                      cache_path=cache, batch_size=batch_size, backend=backend, log=lambda m: typer.echo(m, err=True))
    for benchmark, by_condition in report["results"].items():
        for condition, metrics in by_condition.items():
            for metric, r in metrics.items():
                typer.echo(f"{benchmark:18s} {condition:8s} {metric:20s} {r['rate']:.3f} "
                           f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] n={r['n']}")
    typer.echo(f"wrote {out}/results.json and {out}/samples.jsonl")


# ---------------------------------------------------------------------------------------------------------- train
# (section: train)
@app.command()
def train(config: Path = typer.Argument(..., help="Training YAML (see configs/train/)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="key=value settings over the YAML, e.g. lr=1e-4"),
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Train a stage (align | projector | full | safety-sft | mixed | dpo); rerun the same to resume."""
    from vlsafe.train.config import load_train_config
    from vlsafe.train.engine import train as run_train

    summary = run_train(load_train_config(config, overrides or []), show_progress=not no_progress)
    if summary.pop("is_main", True):  # under `accelerate launch`, one summary, not one per process
        _echo_json(summary)


# (section: safety)
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
    _echo_json({"out": str(out), **manifest["counts"], "refusal_verbatim_duplicates":
                manifest["refusal_verbatim_duplicates"]})


@safety_app.command("vlguard-like")
def safety_vlguard_like(corpus: Path = typer.Option(..., help="A corpus from `vlsafe data synth`."),
                        out: Path = typer.Option(..., help="A new directory: train.json (VLGuard format) + images/."),
                        n: int = typer.Option(200, help="Records per kind (safe image, harmful image)."),
                        seed: int = typer.Option(0)):
    """An offline VLGuard-like safety set for stages `safety-sft` and `mixed` (format: vlguard)."""
    from vlsafe.safety.vlguard_like import build

    _echo_json({"out": str(out), **build(corpus, out, n=n, seed=seed)["counts"]})


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
    _echo_json({"out": str(out), **manifest["counts"]})


@safety_app.command("leakage")
def safety_leakage(path: str = typer.Argument(..., help="Training data to check."),
                   format_name: str = typer.Option("jsonl", "--format", help="Its format (jsonl, llava, vlguard, ...)."),
                   threshold: float = typer.Option(0.8, help="Near-duplicate word-set Jaccard.")):
    """Exit 2 if any evaluation prompt (HarmBench, StrongREJECT, over-refusal, helpfulness) is in PATH."""
    from vlsafe.data import formats
    from vlsafe.safety import leakage

    _echo_json(leakage.check(formats.load(format_name, path), threshold=threshold, where=path))


# ---------------------------------------------------------------------------------------------------------- data
# (section: data)
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

    _echo_json(formats.inspect(path, format_name, image_root=image_root))


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
    _echo_json({"out": str(out), "seed": seed, **manifest["counts"]})


# ---------------------------------------------------------------------------------------------------------- merge
# (section: merge)
merge_app = typer.Typer(cls=_DefaultRunGroup, no_args_is_help=True,
                        help="Merge weights (mergekit-style YAML; VLM-aware): `vlsafe merge CONFIG.yaml --out DIR`.")
app.add_typer(merge_app, name="merge")


@merge_app.command("run", hidden=True)
def merge_run(config: Path = typer.Argument(..., help="mergekit-style merge YAML"),
              out: Path = typer.Option(..., "--out", help="output directory (must not exist)"),
              shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard, e.g. 5GB")) -> None:
    """Merge the models of CONFIG into OUT (weights, manifest, model card, base config and tokenizer)."""
    from vlsafe.merge.engine import merge

    _echo_json(merge(config, out, shard_size=shard_size))


@merge_app.command("sweep")
def merge_sweep(sweep: Path = typer.Argument(..., help="sweep YAML: config + grid of dotted paths"),
                out: Path = typer.Option(..., "--out", help="output directory (must not exist)"),
                shard_size: str = typer.Option("5GB", "--shard-size")) -> None:
    """One merged model per grid point plus sweep.json (not evaluated yet: evaluation is not wired in)."""
    from vlsafe.merge.sweep import sweep as run_sweep

    _echo_json(run_sweep(sweep, out, shard_size=shard_size))


# `bench` is shared with the other benchmarks (eval, train): they add their commands to bench_app
bench_app = typer.Typer(help="Performance benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("merge")
def bench_merge(hidden: int = typer.Option(1024, "--hidden"), layers: int = typer.Option(8, "--layers"),
                vocab: int = typer.Option(32000, "--vocab"),
                methods: str = typer.Option("linear,task_arithmetic,ties", "--methods"),
                repeat: int = typer.Option(1, "--repeat", min=1),
                mergekit: Optional[str] = typer.Option(None, "--mergekit", help="path to mergekit-yaml"),
                work: Optional[str] = typer.Option(None, "--work", help="scratch folder (default: system temp)"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """vlsafe vs mergekit on the same random plain-Llama checkpoints: wall time, peak RSS, output difference."""
    from vlsafe.bench.merge import run as run_bench, table_rows

    report = run_bench(hidden, layers, vocab, methods=tuple(m for m in methods.split(",") if m), repeat=repeat,
                       mergekit=mergekit, work=work)
    if as_json:
        _echo_json(report)
    else:
        _print_table(f"merge: 3 x {report['inputs']['bytes_per_model'] / 1e6:.0f} MB Llama checkpoints",
                     ["method", "vlsafe s", "mergekit s", "vlsafe MiB", "mergekit MiB", "max |diff|"],
                     table_rows(report))


@bench_app.command("train")
def bench_train(llm: str = typer.Option("smollm2-135m-instruct", "--llm"),
                tower: str = typer.Option("efficientnet-lite0", "--tower"),
                steps: int = typer.Option(4, "--steps", help="optimizer steps per side (the first is not timed)"),
                batch_size: int = typer.Option(8, "--batch-size"),
                max_length: int = typer.Option(512, "--max-length"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Stage-2 tokens/s: vlsafe's engine vs a plain transformers.Trainer, same model, data and batch."""
    from vlsafe.bench.train import run as run_bench

    report = run_bench(llm, tower, steps=steps, batch_size=batch_size, max_length=max_length)
    if as_json:
        _echo_json(report)
    else:
        ours, base = report["vlsafe"], report["transformers_trainer"]
        _print_table(f"train: stage 2, {llm} + {tower}, batch {batch_size}, {steps} steps",
                     ["side", "tokens/s", "tokens", "seconds", "final loss"],
                     [["vlsafe", ours["tokens_per_s"], ours["tokens"], ours["seconds"], ours["final_loss"]],
                      ["transformers.Trainer", base["tokens_per_s"], base["tokens"], base["seconds"],
                       base["final_loss"]],
                      ["ratio", report["ratio_tokens_per_s"], "", "", ""]])


@bench_app.command("eval")
def bench_eval(model: str = typer.Option("smollm2-135m-instruct", "--model"),
               n: int = typer.Option(32, "--n", min=1, help="Prompts (benign, from the project's sets)."),
               max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
               batch_size: int = typer.Option(32, "--batch-size", min=1),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Generation throughput: naive one-prompt-at-a-time vs vlsafe's batched engine vs a cache rerun."""
    from vlsafe.bench.eval import run as run_bench

    report = run_bench(model, n=n, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if as_json:
        _echo_json(report)
    else:
        _print_table(f"generation: {report['model']} ({n} prompts, <= {max_new_tokens} new tokens)",
                     ["mode", "seconds", "new tokens/s", "speed-up"],
                     [[m, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.1f}x"]
                      for m, r in report["modes"].items()])


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


if __name__ == "__main__":
    run()
