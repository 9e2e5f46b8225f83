"""The main job and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app


@app.command()
def study(
    config: Optional[Path] = typer.Argument(None, help="A study config (configs/studies/*.yaml); default: the "
                                                       "profile."),
    profile: Optional[str] = typer.Option(None, "--profile", help="default | quick | qwen | pico | a paper-scale "
                                                                  "profile (configs/studies/NAME.yaml)."),
    out: Path = typer.Option(Path("runs/study"), "--out", help="The study folder: rerun the same command to resume."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve every input, print the DAG with estimated costs; "
                                                          "fail with one line per missing input."),
) -> None:
    """The paper's whole experiment as a DAG of cached, resumable stages, ending in report.html / report.md /
    results.json with a verdict per finding."""
    from vlsafe.study.dag import StageFailed
    from vlsafe.study.run import run_study

    try:
        results = run_study(config, profile, out, dry_run=dry_run, log=typer.echo)
    except StageFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    if dry_run:
        return
    from vlsafe.report.markdown import interval

    for claim in results["claims"]:
        estimate = f" {interval(claim)}" if claim.get("estimate") is not None else ""
        typer.echo(f"{claim['id']} {claim['verdict']}{estimate}: {claim['reason']}")
    typer.echo(f"wrote {out}/report.html, {out}/report.md, {out}/results.json")


@app.command()
def report(
    run_dir: Optional[Path] = typer.Argument(None, help="A study folder (finished or partial)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Also write a small summary JSON (docs/results/)."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Rewrite README's results block from "
                                                                 "--results-dir."),
    results_dir: Path = typer.Option(Path("docs/results"), "--results-dir"),
) -> None:
    """Rebuild report.html, report.md and results.json of a study folder from its files; or README's tables."""
    from vlsafe.errors import VlsafeError

    if run_dir is None and readme is None:
        raise VlsafeError("vlsafe report: give a study folder, or --readme README.md")
    if run_dir is not None:
        from vlsafe.report.build import build_report

        if not run_dir.is_dir():
            raise VlsafeError(f"{run_dir}: study folder not found")
        build_report(run_dir, summary_path=summary)
        typer.echo(f"wrote {run_dir}/report.html, {run_dir}/report.md, {run_dir}/results.json"
                   + (f" and {summary}" if summary else ""))
    if readme is not None:
        from vlsafe.report.readme import update_readme

        update_readme(readme, results_dir)
        typer.echo(f"rewrote the results block of {readme} from {results_dir}")
