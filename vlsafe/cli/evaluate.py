"""Judges and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlsafe.cli._app import DefaultRunGroup, app
from vlsafe.errors import VlsafeError

judge_app = typer.Typer(cls=DefaultRunGroup, no_args_is_help=True,
                        help="Judge responses (`vlsafe judge --input F --judge NAME --output G`), or train judges.")
app.add_typer(judge_app, name="judge")


@judge_app.command("run", hidden=True)
def judge(
    input: Path = typer.Option(..., "--input", help="JSONL rows with 'prompt' and 'response'."),
    judge_name: str = typer.Option("default", "--judge",
                                   help="default | refusal-minilm | refusal-patterns | llm:TEMPLATE:BACKEND | DIR."),
    output: Path = typer.Option(..., "--output", help="JSONL out: the rows plus 'verdict', 'refused' and 'score'."),
):
    """Judge responses: adds `verdict` (refusal | compliance | non_answer), `refused` (verdict is refusal) and
    `score` to each row."""
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
    counts = {v: sum(r["verdict"] == v for r in judged) for v in ("refusal", "compliance", "non_answer")}
    typer.echo(f"{len(judged)} rows judged by {judge_name}: {counts['refusal']} refusals, {counts['compliance']} "
               f"compliances, {counts['non_answer']} non-answers -> {output}")


@judge_app.command("train")
def judge_train(out: Optional[Path] = typer.Option(None, "--out", help="New directory (default: refresh the packaged "
                                                                      "classifier in vlsafe/eval/judge_data)."),
                seed: int = typer.Option(0, "--seed")) -> None:
    """Fit the learned refusal judges on the labelled data; write the classifier and a card of held-out accuracy."""
    from vlsafe.eval.judges.train import train as run_train

    run_train(out, seed=seed, log=typer.echo)


eval_app = typer.Typer(cls=DefaultRunGroup, no_args_is_help=True,
                      help="Evaluate a model on a suite (`vlsafe eval --model M --suite S --out DIR`; every option: "
                           "`vlsafe eval run --help`), or compare two evaluations item by item "
                           "(`vlsafe eval compare A B`).")
app.add_typer(eval_app, name="eval")


def _data_options(values: list[str] | None) -> dict[str, str]:
    data = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise VlsafeError(f"--data {value!r}: expected NAME=PATH (a suite entry and its local file)")
        if name.strip() in data:
            raise VlsafeError(f"--data {name.strip()}: given twice")
        data[name.strip()] = path.strip()
    return data


@eval_app.command("run", hidden=True)
def eval_command(
    model: str = typer.Option(..., "--model", help="A VLM directory or any LLM spec (text condition only)."),
    suite: str = typer.Option(..., "--suite", help="quick | study | offline | safety | overrefusal | helpfulness | "
                                                    "paper (bring its data with --data), or a suite .yaml."),
    out: Path = typer.Option(..., "--out", help="New directory for results.json and samples.jsonl."),
    judge_names: Optional[List[str]] = typer.Option(
        None, "--judge", help="Refusal judge (see `vlsafe judge`); repeat for several (default: the suite's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per benchmark."),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated subset, e.g. text,typo."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="A `vlsafe data synth` corpus (image questions)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite cache (default $VLSAFE_CACHE/eval.sqlite)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    backend: str = typer.Option("hf", "--backend", help="hf | vllm (HF-exported models, GPUs)."),
    data: Optional[List[str]] = typer.Option(
        None, "--data", help="NAME=PATH: the local file of a suite entry's published benchmark (repeatable), e.g. "
                             "--data xstest=xstest_prompts.csv for `--suite paper`."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (the default: its greedy answers do not depend on the "
                                                      "batch) | bf16 (faster, and moves verdicts) | auto (bf16 where "
                                                      "the hardware has it)."),
) -> None:
    """Evaluate a model on a suite: per benchmark, condition, category and judge, rates with n and bootstrap 95%
    CIs; kappa between judges. Schema: vlsafe/eval/RESULTS.md."""
    from vlsafe.eval.run import evaluate

    wanted = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    report = evaluate(model, suite, out, judges=judge_names or None, limit=limit, conditions=wanted, corpus=corpus,
                      cache_path=cache, batch_size=batch_size, backend=backend, dtype=dtype,
                      log=lambda m: typer.echo(m, err=True), data=_data_options(data))
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


@eval_app.command("compare")
def eval_compare(
    runs: Optional[List[str]] = typer.Argument(None, help="A B: two `vlsafe eval` output directories."),
    a: Optional[List[str]] = typer.Option(None, "--a", help="A run of side A (repeat, or a glob, for seeds)."),
    b: Optional[List[str]] = typer.Option(None, "--b", help="A run of side B (repeat, or a glob, for seeds)."),
    judge_name: Optional[str] = typer.Option(None, "--judge", help="Whose verdicts (default: A's first judge)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Paired differences B - A per benchmark, condition and metric over the items both runs have: bootstrap 95%
    CI, McNemar p-value, and with several seeds per side their spread; with one run a side, how many items got the
    same verdict and the same answer (e.g. one model evaluated in fp32 and in bf16)."""
    from vlsafe.cli._app import echo_json
    from vlsafe.eval.compare import compare

    runs = list(runs or [])
    if len(runs) > 2:
        raise VlsafeError(f"eval compare: at most two positional runs (A B), got {len(runs)}; use --a/--b for seeds")
    a_dirs, b_dirs = runs[:1] + list(a or []), runs[1:2] + list(b or [])
    result = compare(a_dirs, b_dirs, judge=judge_name, seed=seed)
    if as_json:
        echo_json(result)
        return
    typer.echo(f"judge {result['judge']}; {result['items']['matched']} items matched; seeds A {result['seeds']['a']},"
               f" B {result['seeds']['b']}")
    for r in result["rows"]:
        spread = f" seed sd {r['seed_sd']:.3f}" if r["seed_sd"] is not None else ""
        typer.echo(f"{r['benchmark']:18s} {r['condition']:8s} {r['metric']:20s} n={r['n']:<4d} A {r['a']:.3f} "
                   f"B {r['b']:.3f} B-A {r['difference']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] "
                   f"p={r['p_value']:.3g}{spread}")
    if result["unpaired"]:
        typer.echo(f"not in every run (skipped): {', '.join(result['unpaired'])}")
    if result["agreement"]:
        typer.echo("agreement: " + ", ".join(f"{name} {v['same']}/{v['n']}" + (f" ({v['share']:.1%})" if v["n"] else "")
                                             for name, v in result["agreement"].items()))
