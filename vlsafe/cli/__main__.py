from vlsafe.cli import run

run()
