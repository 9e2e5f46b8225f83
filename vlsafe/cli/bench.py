"""Performance benchmarks, side by side with the baselines."""

from __future__ import annotations

from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json, print_table

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
    from vlsafe.bench.merge import run as run_bench
    from vlsafe.bench.merge import table_rows

    report = run_bench(hidden, layers, vocab, methods=tuple(m for m in methods.split(",") if m), repeat=repeat,
                       mergekit=mergekit, work=work)
    if as_json:
        echo_json(report)
    else:
        print_table(f"merge: 3 x {report['inputs']['bytes_per_model'] / 1e6:.0f} MB Llama checkpoints",
                     ["method", "vlsafe s", "mergekit s", "vlsafe MiB", "mergekit MiB", "max |diff|"],
                     table_rows(report))


@bench_app.command("train")
def bench_train(llm: str = typer.Option("smollm2-135m-instruct", "--llm"),
                tower: str = typer.Option("efficientnet-lite0", "--tower"),
                steps: int = typer.Option(4, "--steps", help="optimizer steps per side (the first is not timed)"),
                batch_size: int = typer.Option(8, "--batch-size"),
                max_length: int = typer.Option(512, "--max-length"),
                dtype: str = typer.Option("auto", "--dtype", help="auto | bf16 | fp32 (both sides)."),
                peak_size: int = typer.Option(2048, "--peak-size", min=16, help="matmul size of the peak measure."),
                rounds: int = typer.Option(1, "--rounds", min=1, help="run the pair N times, alternating which goes first; "
                                                               "each side pools its rounds, each round's ratio listed"),
                stage: str = typer.Option("full", "--stage", help="full (stage 2: projector + LM) | projector "
                                                                   "(stage 1: the projector alone, the LM frozen)"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Training tokens/s and MFU: vlsafe's engine vs a plain transformers.Trainer, same model, batches and
    precision, against the matmul peak measured in the same run."""
    from vlsafe.bench.limits import describe
    from vlsafe.bench.train import run as run_bench

    report = run_bench(llm, tower, steps=steps, batch_size=batch_size, max_length=max_length, dtype=dtype,
                       peak_size=peak_size, rounds=rounds, stage=stage)
    if as_json:
        echo_json(report)
    else:
        ours, base = report["vlsafe"], report["transformers_trainer"]
        print_table(f"train: stage {2 if stage == 'full' else 1} ({stage}), {llm} + {tower}, batch {batch_size}, "
                    f"{steps} steps, {report['precision']}; {describe(report['peak'])}; the LM's own matmuls run at "
                    f"{report['matmul_ceiling']['share']:.0%} of the square rate ({report['matmul_ceiling']['tokens']} "
                    "tokens)",
                     ["side", "tokens/s", "MFU", "tokens", "seconds", "final loss"],
                     [["vlsafe", ours["tokens_per_s"], f"{ours['mfu']:.1%}", ours["tokens"], ours["seconds"],
                       ours["final_loss"]],
                      ["transformers.Trainer", base["tokens_per_s"], f"{base['mfu']:.1%}", base["tokens"],
                       base["seconds"], base["final_loss"]],
                      ["ratio", report["ratio"], "", "", "", ""]]
                     + ([[f"ratio, round {i + 1}", r["ratio"], "", "", "", ""] for i, r in enumerate(report["rounds"])]
                        if len(report["rounds"]) > 1 else []))


def _parted(report: dict) -> str:
    """", the others part where the greedy choice led by at most 0.12 logits" (what `parted` found)."""
    leads = [r["lead"] for r in report.get("parted", [])]
    return f", the others part where the greedy choice led by at most {max(leads):.2f} logits" if leads else ""


@bench_app.command("eval")
def bench_eval(model: str = typer.Option("smollm2-135m-instruct", "--model"),
               n: int = typer.Option(64, "--n", min=1, help="Prompts (benign, from the project's sets)."),
               max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
               batch_size: int = typer.Option(64, "--batch-size", min=1,
                                               help="The batched engine's rows (the study profiles evaluate at 64)."),
               threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                                     help="torch threads for both sides (default: torch's)."),
               dtype: str = typer.Option("fp32", "--dtype", help="fp32 (what `vlsafe eval` runs by default) | bf16 "
                                                                 "| auto (every mode)."),
               peak_size: int = typer.Option(2048, "--peak-size", min=16, help="matmul size of the peak measure."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Generation throughput and MFU: naive one-prompt-at-a-time vs vlsafe's batched engine vs a cache rerun,
    in the same precision, against the matmul peak measured in the same run."""
    from vlsafe.bench.eval import run as run_bench
    from vlsafe.bench.limits import describe

    report = run_bench(model, n=n, max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads,
                       dtype=dtype, peak_size=peak_size)
    if as_json:
        echo_json(report)
    else:
        print_table(f"generation: {report['model']} ({report['n']} prompts, <= {max_new_tokens} new tokens, batch "
                    f"{batch_size}, {report['threads']} threads, {report['precision']}; "
                    f"{report['same_text_naive_vs_batched']}/{report['n']} answers identical{_parted(report)}; "
                    f"{describe(report['peak'])})",
                     ["mode", "seconds", "new tokens/s", "MFU", "speed-up", "generated"],
                     [[m, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}",
                       "-" if r["mfu"] is None else f"{r['mfu']:.2%}",  # the cached pass computed nothing
                       f"{r['speedup']:.1f}x", r["generated"]] for m, r in report["modes"].items()])
