"""`deto train --bandwidth`: a real shaped run across network namespaces (root + iproute2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deto.netem import parse_netns_list

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
        reason="needs root and iproute2 (network namespaces, tc)",
    ),
]

TINY = ["--nodes", "2", "--ranks-per-node", "1", "--steps", "4", "--eval-every", "2",
        "--d-model", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "4",
        "--eval-samples", "16"]


def _namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_shaped_run_limits_the_link_restarts_a_killed_rank_and_removes_its_namespaces(tmp_path):
    """One shaped run, three promises: the link is really limited; a rank killed with -9 after
    the first checkpoint is restarted with every other rank of both nodes in one rendezvous
    round, all continuing from that checkpoint; and the namespaces are gone at the end."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deto", "train", "--bandwidth", "20mbit", "--out", str(out),
         *TINY, "--checkpoint-every", "2", "--max-restarts", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000002" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.01)
    ranks = [pid for pid in _processes_mentioning(str(out / "train.toml"))
             if b"deto.launch.agent" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert ranks, "no rank process found"
    os.kill(max(ranks), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "restarted: continuing from" in err and "step_00000002" in err, err[-3000:]
    assert "stopped answering" not in err, err[-3000:]  # no node started afresh alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000002") and summary["steps"] == 4
    link = summary["link"]
    assert link["bandwidth_bps"] == 20_000_000 and "tbf" in link["method"]
    measured = link["probe"]["measured_bps"]
    assert 5e6 < measured <= 1.15 * 20e6, measured  # really limited, not a label
    assert summary["replicas_identical"] is True and summary["inter_node_bytes_sent_per_step"] > 0
    assert link["run_id"] not in _namespaces()


def test_bandwidth_needs_two_nodes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deto", "train", "--bandwidth", "20mbit", "--nodes", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "deto train: error: --bandwidth needs at least 2 nodes, got 1"
    )


def test_bad_bandwidth_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deto", "train", "--bandwidth", "10mbps", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mbps" in proc.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def test_sigterm_stops_every_node_and_removes_the_namespaces(tmp_path):
    out = tmp_path / "run"
    before = _namespaces()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deto", "train", "--bandwidth", "20mbit", "--out", str(out), "-q",
         *TINY[:4], "--steps", "100000", *TINY[6:]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists():  # training has started on every rank
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started"
        time.sleep(0.2)
    # the run's own namespaces carry its PID (another shaped run may be going on meanwhile)
    ours = {
        ns for ns in set(parse_netns_list(_namespaces())) - set(parse_netns_list(before))
        if ns.startswith(f"deto-{proc.pid}-")
    }
    assert ours, "the run's namespaces were not found"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(1)
    assert not _processes_mentioning(str(out)), "ranks or node agents outlived the run"
    assert not ours & set(parse_netns_list(_namespaces()))
