"""``deto train`` end to end: real ranks spawned by the CLI, tiny models, a few steps each."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deto.launch.ftcluster import rank_pids
from deto.run.snapshot import snapshot_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = ["--d-model", "32", "--layers", "1", "--heads", "2", "--batch-size", "4", "--warmup", "2"]
TINY = ["--steps", "6", "--eval-every", "3", "--log-every", "2", *MODEL]
LM = ["--seq-len", "16", "--eval-samples", "16"]
TINY_LM = [*TINY, *LM]
TIMEOUT_S = 240


def deto(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "deto", *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=TIMEOUT_S, check=False,
    )


def train(out: Path, *args: str) -> dict:
    proc = deto("train", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "final val loss" in proc.stdout  # the summary table
    return json.loads((out / "summary.json").read_text())


REQUIRED = (
    "scheme", "task", "nodes", "ranks_per_node", "steps", "params", "final_val_loss", "val_loss",
    "train_loss", "wall_time_s", "step_time_s_median", "inter_node_bytes_sent_per_step",
    "inter_node_bytes_received_per_step", "full_sync_bytes_per_step", "compression_ratio",
    "replicas_identical", "peak_rss_mb_per_rank", "link", "versions", "git_sha",
)


def check_common(s: dict, out: Path, scheme: str, nodes: int, per_node: int) -> None:
    assert set(REQUIRED) <= set(s)
    assert (s["scheme"], s["nodes"], s["ranks_per_node"], s["steps"]) == (
        scheme, nodes, per_node, 6
    )
    assert s["params"] > 0 and math.isfinite(s["final_val_loss"])
    assert [step for step, _ in s["val_loss"]] == [3, 6]
    assert s["val_loss"][-1][1] == s["final_val_loss"]
    assert [step for step, _ in s["train_loss"]] == [2, 3, 4, 6]
    assert s["wall_time_s"] > 0 and s["step_time_s_median"] > 0
    assert s["full_sync_bytes_per_step"] == 4 * s["params"] * 2 * (nodes - 1) // nodes
    assert len(s["peak_rss_mb_per_rank"]) == nodes * per_node
    assert s["link"] is None
    assert set(s["versions"]) == {"python", "torch", "deto"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3, 4, 6]
    assert (out / "loss.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def flexdemo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """FlexDeMo on the vision task (the ViT), 2 x 1; on the LM task: the other runs here."""
    out = tmp_path_factory.mktemp("flexdemo")
    return out, train(out, "--scheme", "flexdemo", "--task", "vision", "--ranks-per-node", "1",
                      *TINY)  # fmt: skip


def test_flexdemo_vision(flexdemo) -> None:
    out, s = flexdemo
    check_common(s, out, "flexdemo", 2, 1)
    assert s["task"] == "vision" and s["model"] == "vit" and 0 <= s["final_val_accuracy"] <= 1
    assert "unigram_entropy" not in s
    assert 0 < s["inter_node_bytes_sent_per_step"] < s["full_sync_bytes_per_step"]
    assert s["compression_ratio"] > 1
    assert s["replicas_identical"] is True


def test_flexdemo_on_torchft_resumes_and_equals_the_static_run(flexdemo, tmp_path) -> None:
    """--ft: every node is its own torch world and the replicate axis runs over torchft's
    managed group, with the same numbers as the static cluster (the training loss is each
    node's own), also when every node stops after a checkpoint and resumes its own."""
    pytest.importorskip("torchft")
    ft = ["train", "--out", str(tmp_path), "--ft", "--scheme", "flexdemo", "--task", "vision",
          "--ranks-per-node", "1", "--checkpoint-every", "3", *TINY]  # fmt: skip
    first = deto(*ft, "--stop-at", "3")
    assert first.returncode == 0, first.stderr[-4000:]
    proc = deto(*ft, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("final val loss") == 1  # node 0's table, once
    nodes = [json.loads((tmp_path / f"node{k}" / "summary.json").read_text()) for k in (0, 1)]
    static = flexdemo[1]
    for key in ("val_loss", "inter_node_bytes_sent_per_step", "full_sync_bytes_per_step"):
        assert nodes[0][key] == nodes[1][key] == static[key], key
    assert nodes[0]["replicas_identical"] is nodes[1]["replicas_identical"] is True
    assert (nodes[0]["nodes"], nodes[0]["ranks_per_node"]) == (2, 1)
    for k, node in enumerate(nodes):
        assert node["resumed_from"] == str(tmp_path / f"node{k}" / "checkpoints" / "step_00000003")
    for k, node in enumerate(nodes):
        seat = {key: node["torchft"][key] for key in
                ("node_index", "recovered_from_peer", "failed_attempts", "first_step")}  # fmt: skip
        assert seat == {"node_index": k, "recovered_from_peer": 0, "failed_attempts": 0,
                        "first_step": 4}  # fmt: skip  (the resumed run's first: after step 3)
        assert node["torchft"]["slowest_step"][0] in range(4, 7)
    assert "should_commit" not in proc.stderr  # torchft's per-step logging is off without -v
    assert "Quorum" not in proc.stderr


def test_a_killed_node_rejoins_on_torchft_while_the_other_goes_on(tmp_path) -> None:
    """--ft --max-restarts 1: node 1's rank is killed at step 20 of 200; node 0 goes on alone,
    node 1's agent restarts it, it continues from its own newest checkpoint, fetches node 0's
    newer state and joins at the current step, and both end with identical replicas."""
    pytest.importorskip("torchft")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deto", "train", "--out", str(tmp_path), "--ft",
         "--ranks-per-node", "1", "--max-restarts", "1", "--steps", "200", "--eval-every",
         "200", "--log-every", "10", "--checkpoint-every", "10", *MODEL, *LM],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics, deadline = tmp_path / "node1" / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and '"step": 20,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "step 20 never came"
        time.sleep(0.01)
    ranks = rank_pids(1)
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    assert out.count("final val loss") == 1
    nodes = [json.loads((tmp_path / f"node{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert nodes[0]["steps"] == nodes[1]["steps"] == 200
    assert nodes[0]["task"] == "lm" and 0 < nodes[0]["unigram_entropy"] < math.log(256)
    assert nodes[0]["torchft"]["first_step"] == 1
    assert nodes[0]["torchft"]["recovered_from_peer"] == 0
    assert Path(nodes[1]["resumed_from"]).name in ("step_00000010", "step_00000020")
    joined = nodes[1]["torchft"]
    assert joined["recovered_from_peer"] == 1 and 20 < joined["first_step"] < 200, joined
    assert nodes[0]["replicas_identical"] is nodes[1]["replicas_identical"] is True
    assert nodes[0]["val_loss"] == nodes[1]["val_loss"]


def test_diloco_and_none_promise_no_identical_replicas(tmp_path) -> None:
    # 6 steps, H=4: the run ends between synchronisations
    s = train(
        tmp_path / "diloco", "--scheme", "diloco", "--every", "4", "--ranks-per-node", "1", *TINY_LM
    )
    check_common(s, tmp_path / "diloco", "diloco", 2, 1)
    assert s["replicas_identical"] is None
    assert 0 < s["inter_node_bytes_sent_per_step"] < s["full_sync_bytes_per_step"]
    s = train(tmp_path / "none", "--scheme", "none", "--ranks-per-node", "1", *TINY_LM)
    check_common(s, tmp_path / "none", "none", 2, 1)
    assert s["replicas_identical"] is None
    assert s["inter_node_bytes_sent_per_step"] == 0 and s["compression_ratio"] is None


RESUMABLE = [
    "--scheme", "flexdemo-adamw", "--lr-schedule", "constant", "--eval-every", "4",
    "--log-every", "2", "--steps", "12", "--checkpoint-every", "4", *MODEL, *LM,
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """12 steps in one go, a checkpoint every 4: what the resumed runs must equal."""
    out = tmp_path_factory.mktemp("straight")
    return out, train(out, *RESUMABLE)


def same_run(a: dict, b: dict) -> None:
    assert a["params_sha256"] == b["params_sha256"]  # model (every rank's shard)
    assert a["val_loss"] == b["val_loss"]
    assert a["train_loss"] == b["train_loss"]
    assert a["steps"] == b["steps"] == 12


def test_resume_continues_bitwise(straight, tmp_path) -> None:
    """12 steps in one go == 4 steps, then resumed from the step-4 checkpoint for 8 more."""
    out, whole = straight
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000004", "step_00000008", "step_00000012"
    ]
    for ckpt in checkpoints.iterdir():
        assert (ckpt / "COMPLETE").is_file() and len(list(ckpt.glob("rank*.pt"))) == 4
    rest = train(tmp_path / "rest", *RESUMABLE, "--resume", str(checkpoints / "step_00000004"))
    assert rest["resumed_from"].endswith("step_00000004")
    same_run(rest, whole)
    # a run directory resumes from its latest complete checkpoint: here the end, nothing to do
    proc = deto("train", "--resume", str(out), *RESUMABLE)
    assert proc.returncode == 2 and "nothing to do" in proc.stderr


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_a_rank_and_finish(out: Path, ready: Callable[[], bool], *extra: str) -> str:
    """Run RESUMABLE (then ``extra``) with --max-restarts 1, kill -9 one rank as soon as
    ``ready()``; the run must finish. Returns its stderr."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deto", "train", "--out", str(out), "--max-restarts", "1",
         *RESUMABLE, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "the moment never came"
        time.sleep(0.002)
    leaves = [p for p in _descendants(proc.pid) if not _descendants(p)]
    assert leaves, "no rank process found"
    os.kill(max(leaves), signal.SIGKILL)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    return err


def test_a_kill_during_a_checkpoint_save_resumes_from_the_newest_snapshot(straight, tmp_path):
    """A checkpoint every 4 steps, an in-memory snapshot at the steps between (2, 6, 10): a rank
    killed while step 8's checkpoint is being written. The half-written checkpoint never
    counts; the restart continues from step 6's snapshot, newer than checkpoint 4; the run
    still ends bitwise like the straight one, and the snapshots are gone afterwards.
    (Restarting from a disk checkpoint alone: tests/e2e/test_cli_bandwidth.py.)"""
    out = tmp_path / "killed-in-save"
    checkpoints = out / "checkpoints"
    err = _kill_a_rank_and_finish(
        out, (checkpoints / ".step_00000008.incomplete").is_dir, "--snapshot-every", "2"
    )
    assert "continuing from the in-memory snapshot of step 6" in err, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == "in-memory snapshot of step 6"
    same_run(summary, straight[1])
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000004", "step_00000008", "step_00000012"
    ]  # the half-written one was replaced by the restarted run's own
    assert not snapshot_dir(out).exists()


def test_a_full_disk_ends_in_one_line(tmp_path) -> None:
    """--out on a tmpfs too small for the first checkpoint: one line naming the cause, the
    traceback in the run's error.log, and the half-written checkpoint removed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        proc = deto("train", "--out", str(disk / "run"), *RESUMABLE, "--ranks-per-node", "1")
        leftovers = [p.name for p in (disk / "run" / "checkpoints").iterdir()]
        logged = (disk / "run" / "error.log").read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last and "free space under --out" in last, proc.stderr[-3000:]
    assert "error.log" in last
    assert "Traceback" not in proc.stderr and "No space left on device" in logged
    assert leftovers == []


def test_bad_input_exits_2_with_one_line() -> None:
    # (more bad inputs, in-process: tests/unit/test_train_cli.py)
    proc = deto("train", "--ranks-per-node", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "deto train: error: --ranks-per-node must be an integer >= 1, got 0 "
        "(see deto train --help)"
    )
    assert proc.stdout == ""


def test_ctrl_c_stops_every_rank(tmp_path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    argv = [
        sys.executable, "-m", "deto", "train", "--out", str(tmp_path), "--steps", "100000",
        "--ranks-per-node", "1", "--log-every", "1", *MODEL, *LM,
    ]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().endswith("deto train: interrupted")
    assert "Traceback" not in err
    deadline = time.monotonic() + 20
    while True:  # every rank is gone with the launcher
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "ranks outlived the launcher"
        time.sleep(0.2)


def test_eager_overlap_resumes_and_restarts_bitwise(tmp_path) -> None:
    """--overlap (eager: an all-gather in flight and a consensus at every step, AdamW's state
    put back after each trial step): a resume from a checkpoint, and a restart after a rank is
    killed while a checkpoint is written (from the snapshot before it), both end bitwise like
    the run in one go."""
    whole = train(tmp_path / "straight", *RESUMABLE, "--overlap")
    assert whole["replicas_identical"] is True
    rest = train(tmp_path / "rest", *RESUMABLE, "--overlap", "--resume",
                 str(tmp_path / "straight" / "checkpoints" / "step_00000004"))
    same_run(rest, whole)
    out = tmp_path / "killed"
    _kill_a_rank_and_finish(out, (out / "checkpoints" / ".step_00000008.incomplete").is_dir,
                            "--snapshot-every", "2", "--overlap")
    same_run(json.loads((out / "summary.json").read_text()), whole)
