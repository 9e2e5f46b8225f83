"""The vlsafe command line. Each command parses its arguments, then calls one library function; no logic here.

Bad input raises `VlsafeError` anywhere below; `main` prints it on one line and exits with status 2. The commands
live in one module per section (assets, model, evaluate, train, safety, data, merge, bench), registered on `app`
when imported here.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from vlsafe.cli._app import app
# importing a section registers its commands on `app`, in this order in --help  # isort: skip
from vlsafe.cli import model, evaluate, study, train, assets, data, safety, merge, analyze, bench  # noqa: F401, I001
from vlsafe.errors import VlsafeError

__all__ = ["app", "main", "run"]


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: returns the exit status (2 for bad input, with one line naming what is wrong)."""
    try:
        # without standalone mode, click returns the code of a typer.Exit instead of raising it
        status = app(args=argv, prog_name="vlsafe", standalone_mode=False)
    except VlsafeError as err:
        for line in err.problems or [str(err)]:
            typer.echo(f"error: {_one_line(line)}", err=True)
        return 2
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as err:  # a usage error (typer carries its own click): unknown option, bad value
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        typer.echo(f"error: {_one_line(message)}", err=True)
        return 2
    return status if isinstance(status, int) else 0


def _one_line(text: str) -> str:
    """Control characters from a bad file (a newline or vertical tab in a CSV header) escaped, so the message
    stays the one line scripts and users rely on."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def run() -> None:
    sys.exit(main())
