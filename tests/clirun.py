"""The tests' way to run the llamalens CLI in-process (click's CliRunner): every argument as text, and
the exit status checked unless ok=False (then the caller checks it and the message)."""

from click.testing import CliRunner

from llamalens.cli import main


def cli(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res
