"""The root typer app and what every command module shares: JSON output, tables, default-subcommand groups."""

from __future__ import annotations

import typer

app = typer.Typer(help="vlsafe: what VL adaptation does to an LLM's safety, and how to get it back.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def echo_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


class DefaultRunGroup(typer.core.TyperGroup):
    """A group whose arguments go to its hidden `run` command unless they name a subcommand or ask for help:
    `vlsafe merge CONFIG --out DIR` next to `vlsafe merge sweep`, `vlsafe judge --input F` next to `judge train`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0, overflow="fold")  # the first column is what users type
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)

