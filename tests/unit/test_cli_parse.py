"""Parsing ``deto``'s command line: errors name the subcommand, numeric flags have ranges."""

from __future__ import annotations

import pytest

from deto import cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse exits by itself
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["train", "--nosuchflag"], "deto train: error: unrecognized arguments: --nosuchflag"),
        (["bench", "--nosuchflag"], "deto bench: error: unrecognized arguments: --nosuchflag"),
        (["info", "--nosuchflag"], "deto info: error: unrecognized arguments: --nosuchflag"),
        (["info", "extra"], "deto info: error: unrecognized arguments: extra"),
        (["train", "--steps"], "deto train: error: argument --steps: expected one argument"),
        (["--nosuchflag"], "deto: error: unrecognized arguments: --nosuchflag"),
        (["nosuchcommand"], "deto: error: argument COMMAND: invalid choice"),
    ],
)
def test_a_parse_error_names_the_subcommand(capsys, argv, prefix) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
