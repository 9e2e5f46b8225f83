"""Usage errors the command-line parser finds (unknown command or option, a value out of range or of the wrong
type) are one line on stderr and exit status 2, like every other bad input: typer carries its own copy of click,
whose exceptions are not the `click` package's."""

import pytest

from vlsafe.cli import main


@pytest.mark.parametrize("argv, says", [
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["eval", "--bogus"], "No such option: --bogus"),
    (["bench", "train", "--rounds", "0"], "Invalid value for '--rounds'"),
    (["bench", "eval", "--n", "many"], "Invalid value for '--n'"),
    (["study", "--dry-run", "--profile"], "requires an argument"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
