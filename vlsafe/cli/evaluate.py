"""The study, judges and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlsafe.cli._app import DefaultRunGroup, app
from vlsafe.errors import VlsafeError



@app.command()
def study(
    out: Path = typer.Option(Path("runs/study"), help="Output directory (a new one; a timestamp is added if it exists)."),
    llm: str = typer.Option("smollm2-135m-instruct", help="The LLM to study."),
    tower: str = typer.Option("efficientnet-lite0", help="The vision tower to attach."),
    n_harmful: Optional[int] = typer.Option(None, help="Items per harmful benchmark (default: the study suite's)."),
    n_benign: Optional[int] = typer.Option(None, help="Items per over-refusal and helpfulness benchmark (default: "
                                                      "the study suite's)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation length (default: the study suite's)."),
    seed: int = typer.Option(0, help="Item sampling, bootstrap, decoding and the projector's initialisation."),
):
    """The main job: `vlsafe eval` of the LLM and its VLM@0 on the study suite, then a side-by-side summary."""
    import time

    from vlsafe.study.baseline import BaselineConfig, run_baseline

    if out.exists():
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = BaselineConfig(llm=llm, tower=tower, n_harmful=n_harmful, n_benign=n_benign,
                            max_new_tokens=max_new_tokens, seed=seed)
    run_baseline(out, config, log=typer.echo)
    typer.echo(f"wrote {out}/results.json (summary), {out}/llm and {out}/vlm0 (eval runs), {out}/models/vlm0")


judge_app = typer.Typer(cls=DefaultRunGroup, no_args_is_help=True,
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
    try:
        text = input.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise VlsafeError(f"{input}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for n, line in enumerate(text.split("\n"), 1):
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
    judge_names: Optional[List[str]] = typer.Option(
        None, "--judge", help="Refusal judge (see `vlsafe judge`); repeat for several (default: the suite's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per benchmark."),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated subset, e.g. text,typo."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="A `vlsafe data synth` corpus (image questions)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite cache (default $VLSAFE_CACHE/eval.sqlite)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    backend: str = typer.Option("hf", "--backend", help="hf | vllm (HF-exported models, GPUs)."),
) -> None:
    """Evaluate a model on a suite: per benchmark, condition, category and judge, rates with n and bootstrap 95%
    CIs; kappa between judges. Schema: vlsafe/eval/RESULTS.md."""
    from vlsafe.eval.run import evaluate

    wanted = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    report = evaluate(model, suite, out, judges=judge_names or None, limit=limit, conditions=wanted, corpus=corpus,
                      cache_path=cache, batch_size=batch_size, backend=backend, log=lambda m: typer.echo(m, err=True))
    unmeasured = {}  # metric -> why, for the rows with no value (printed once, not once per row)
    for r in report["results"]:
        if r["category"] != "*":
            continue
        if r["value"] is None:
            unmeasured.setdefault(r["metric"], r["reason"])
            continue
        where = f"{r['benchmark']:18s} {r['condition']:8s} {r['metric']:24s} {r['judge']:18s}"
        typer.echo(f"{where} {r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] n={r['n']}")
    for metric, reason in unmeasured.items():
        typer.echo(f"{metric}: not measured in some rows ({reason}; see results.json)")
    for a in report["agreement"]:
        if a["benchmark"] == "*" and a["n"]:
            kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:.3f}"
            typer.echo(f"kappa {a['judges'][0]} vs {a['judges'][1]}: {kappa}, agreement {a['agreement']:.3f} "
                       f"n={a['n']}")
    typer.echo(f"wrote {out}/results.json and {out}/samples.jsonl")
