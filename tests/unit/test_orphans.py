"""Orphans of a killed shaped run: found by namespace, identified as deto's, stopped."""

from __future__ import annotations

import subprocess
import sys

from deto.netem.orphans import is_deto_process, namespace_pids, orphans, read_cmdline, stop_pids


def fake_runner(pids: dict[str, list[int]]):
    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        assert argv[:3] == ["ip", "netns", "pids"]
        if argv[3] not in pids:
            return subprocess.CompletedProcess(argv, 1, "", "Cannot open network namespace")
        return subprocess.CompletedProcess(argv, 0, "".join(f"{p}\n" for p in pids[argv[3]]), "")

    return run


def test_deto_processes_are_told_from_others() -> None:
    assert is_deto_process("/usr/bin/python3 -m torch.distributed.run --nnodes=2 -m deto train")
    assert is_deto_process("/venv/bin/python -m deto train --config runs/x/train.toml -q")
    assert is_deto_process("python -I /src/deto/netem/probe_peer.py receive 10.0.0.1 1 9 5")
    assert not is_deto_process("/usr/sbin/sshd -D")
    assert not is_deto_process("python -m http.server")


def test_orphans_split_by_namespace_and_kind() -> None:
    runner = fake_runner({"deto-1-ab-n0": [10, 11], "deto-1-ab-n1": [12]})
    lines = {10: "python -m torch.distributed.run -m deto train", 11: "sleep 100", 12: None}
    ours, others = orphans(["deto-1-ab-n0", "deto-1-ab-n1", "gone"], runner, lines.get)
    assert (ours, others) == ([10], [11])
    assert namespace_pids("gone", runner) == []


def test_stop_pids_ends_a_process_that_ignores_sigterm() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    assert "signal.SIG_IGN" in (read_cmdline(proc.pid) or "")
    stop_pids([proc.pid], grace_s=0.2)
    assert proc.wait(timeout=30) == -9
