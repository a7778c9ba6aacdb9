"""The ``deto`` command line without launching ranks: parsing, bad input, ``deto info``."""

from __future__ import annotations

import json

import pytest

from deto import cli
from deto.run.config import FIELDS


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse exits by itself
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be an integer >= 1, got 0"),
        (["--nodes", "two"], "--nodes must be an integer >= 1, got 'two'"),
        (["--lr", "fast"], "--lr must be a number in (0.0, 1000.0], got 'fast'"),
        (["--scheme", "dmeo"], "invalid choice: 'dmeo'"),
        (["--config", "/nonexistent/run.toml"], "Config file not found"),
        (["--scheme", "demo", "--ranks-per-node", "2"], "Invalid topology"),
        (["--scheme", "hsdp", "--topk", "4"], "--topk does not apply to scheme 'hsdp'"),
        (["--nodes", "40", "--ranks-per-node", "4"], "too many to simulate"),
        (["--resume", "/nonexistent/run"], "Checkpoint not found"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--model", "bert"], "invalid choice: 'bert'"),
        (["--model", "resnet", "--task", "lm"], "Invalid model: 'resnet' does not fit task 'lm'"),
        (["--ft", "--bandwidth", "100mbit", "--nodes", "1"], "--bandwidth needs at least 2"),
        (["--ft", "--check-replicas-every", "5"], "--check-replicas-every does not apply"),
        (["--ft", "--resume", "/nonexistent/run"], "Checkpoint not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, argv, message) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = _run(capsys, "train", *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""


def test_torchrun_topology_must_agree_with_flags(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    code, _, err = _run(capsys, "train", "--nodes", "3")
    assert code == 2 and "disagrees with torchrun's 2 node(s) x 2 rank(s)" in err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    code, _, err = _run(capsys, "train")
    assert code == 2 and "not a multiple" in err


def test_torchft_under_torchrun_is_one_world_per_node(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    code, _, err = _run(capsys, "train", "--ft", "--node-index", "0")
    assert code == 2 and "start torchrun with --nnodes 1 on every node" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _run(capsys, "train", "--ft", "--ranks-per-node", "1")
    assert code == 2 and "--ranks-per-node 1 disagrees with torchrun's 2 rank(s)" in err
    code, _, err = _run(capsys, "train", "--ft", "--lighthouse", "http://lh:1")
    assert code == 2 and "--ft under torchrun needs --node-index" in err
    code, _, err = _run(capsys, "train", "--ft", "--node-index", "1")
    assert code == 2 and "needs --lighthouse or $TORCHFT_LIGHTHOUSE" in err
    code, _, err = _run(capsys, "train", "--ft", "--node-index", "2")
    assert code == 2 and "Invalid node_index: 2" in err


def test_torchft_topology_takes_the_lighthouse_from_the_environment() -> None:
    from deto.launch.dispatch import torchft_topology

    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHFT_LIGHTHOUSE": "http://lh:29510"}
    values = torchft_topology({"ft": True, "nodes": 3}, env)
    assert values == {"ft": True, "nodes": 3, "ranks_per_node": 2, "lighthouse": "http://lh:29510"}
    given = torchft_topology({"ft": True, "lighthouse": "http://other:1"}, env)
    assert given["lighthouse"] == "http://other:1"


def test_help_lists_every_flag_and_scheme(capsys) -> None:
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in out
    for scheme in ("hsdp", "flexdemo-adamw", "diloco", "striding"):
        assert f"  {scheme} " in out


def test_info(capsys) -> None:
    code, out, _ = _run(capsys, "info", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["backend"] in ("gloo", "nccl")
    assert {"demo", "full", "none", "diloco"} <= set(data["replicators"])
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "replicators:" in out


def test_no_command_prints_help(capsys) -> None:
    code, _, err = _run(capsys)
    assert code == 2 and "train" in err


def test_a_failed_rank_is_reported_in_one_line() -> None:
    from types import SimpleNamespace

    from deto.launch.local import _failure_message, _failure_traceback

    raised = SimpleNamespace(
        message={
            "message": "ValueError: bad\nthing", "extraInfo": {"py_callstack": "Traceback ..."}
        },
        exitcode=1,
        error_file_data={"message": "..."},
    )
    assert _failure_message(raised) == "ValueError: bad"
    assert _failure_traceback(raised) == "Traceback ..."
    killed = SimpleNamespace(
        message="Signal 9 (SIGKILL) received by PID 7", exitcode=-9, error_file_data={}
    )
    assert _failure_message(killed) == "killed by SIGKILL"
    exited = SimpleNamespace(message="To enable traceback see: ...", exitcode=3, error_file_data={})
    assert _failure_message(exited) == "see the messages above"


def test_a_rank_that_told_its_failure_is_reported_as_it_told_it(tmp_path) -> None:
    from deto.launch.local import ERROR_LOG, RankFailure

    told = RankFailure(3, "RankError: node 1, rank 3: the disk is full (...); free space", 1, "Tb")
    assert str(told) == "node 1, rank 3: the disk is full (...); free space"
    told.write_log(tmp_path / "run")
    assert told.log_file == tmp_path / "run" / ERROR_LOG
    assert told.log_file.read_text() == "rank 3 (exit code 1):\nTb"
    plain = RankFailure(0, "ValueError: bad", 1)
    assert str(plain) == "rank 0 failed (exit code 1): ValueError: bad"
    plain.write_log(tmp_path / "other")
    assert plain.log_file is None  # no traceback, no file
