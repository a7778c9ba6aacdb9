"""The simulated cluster on torchft (``deto train --ft``): one torch world per node.

On torchft a node is a replica group (:mod:`deto.ft`): its ranks form their own torch world,
and the nodes meet only through the Lighthouse and the replicate axis's managed group. This
driver starts a Lighthouse and one ``torchrun --standalone`` per node, each with its
``--node-index`` and ``--max-restarts``: exactly what a user runs on every machine of a real
cluster, with the Lighthouse on one of them. With ``--bandwidth`` every node runs in its own
network namespace behind a shaped link (:func:`deto.launch.shaped.emulated_cluster`), under
a host name of its own, and the Lighthouse in node 0's namespace. When a node's rank dies,
only that node's agent restarts its ranks; they rejoin at the current step with a live
peer's state while the other nodes go on. A node that fails for good does not stop the
others: the run ends when every node has ended, with node 0's summary (or, when node 0
failed, the lowest finished node's), and a warning that names the failed node and its cause.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from deto.launch import agent
from deto.launch.shaped import (
    GRACE_S,
    emulated_cluster,
    node_failure,
    node_processes,
    rank_program,
)
from deto.netem import EmulatedCluster, LinkSpec
from deto.proc.lifetime import popen_kwargs
from deto.proc.processes import stop_processes
from deto.run import report
from deto.run.loop import node_dir

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_MS = 5000
"""Silence after which the Lighthouse drops a node from the quorum: the survivors' stall."""
JOIN_TIMEOUT_MS = 1000
"""How long a quorum waits for a node that is alive but late."""
LIGHTHOUSE_PORT = 29510  # torchft's default; free in node 0's fresh namespace


def train_on_torchft(
    values: Mapping[str, Any],
    nodes: int,
    ranks_per_node: int,
    out: Path,
    log_level: int,
    link: LinkSpec | None = None,
) -> dict[str, Any] | None:
    """Run ``deto train --ft`` with ``values`` as ``nodes`` torch worlds of ``ranks_per_node``
    ranks on this machine, over links shaped to ``link`` if given (one network namespace per
    node, as :mod:`deto.launch.shaped`). Node 0 prints its own summary; when node 0 failed,
    return the summary of the lowest node that finished, to print.

    Raises ``RuntimeError`` with the failing rank's line when no node finished.
    """
    os.environ.setdefault("RUST_LOG", "error")  # torchft's servers log every quorum otherwise
    program = rank_program(values, out, log_level)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    description = None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deto-agents-")))
        if link is None:
            lighthouse, prefix = stack.enter_context(lighthouse_here()), _no_prefix
        else:
            cluster = stack.enter_context(emulated_cluster(nodes, link))
            lighthouse = stack.enter_context(lighthouse_in_node0(cluster, log_dir))
            prefix = partial(_inside, cluster)
            description = cluster.describe()
        codes = run_torchft_nodes(
            [node_argv(node, ranks_per_node, program, lighthouse=lighthouse,
                       max_restarts=int(values.get("max_restarts") or 0), prefix=prefix(node))
             for node in range(nodes)],
            log_dir=log_dir, tmp_dir=tmp,
        )  # fmt: skip
    finished = [node for node, code in enumerate(codes) if code == 0]
    if not finished:
        raise RuntimeError(node_failure(log_dir, codes[0]))
    failed = [node for node, code in enumerate(codes) if code != 0]
    if failed:
        logger.warning(
            "node(s) %s failed and the others finished without them: %s",
            ", ".join(map(str, failed)), node_failure(log_dir, codes[failed[0]]),
        )
    summaries = {node: out / node_dir(node) / "summary.json" for node in finished}
    if description is not None:
        for path in summaries.values():
            report.write_json(path, {**json.loads(path.read_text()), "link": description})
    if finished[0] == 0:
        return None  # node 0's rank 0 printed its summary on this terminal
    return json.loads(summaries[finished[0]].read_text())


@contextlib.contextmanager
def lighthouse_here() -> Iterator[str]:
    """A Lighthouse in this process, on loopback; yields its address."""
    from deto.ft import start_lighthouse

    server = start_lighthouse(
        "127.0.0.1:0", min_replicas=1, join_timeout_ms=JOIN_TIMEOUT_MS,
        heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
    )  # fmt: skip
    try:
        yield server.address()
    finally:
        server.shutdown()


@contextlib.contextmanager
def lighthouse_in_node0(cluster: EmulatedCluster, log_dir: Path) -> Iterator[str]:
    """torchft's ``torchft_lighthouse`` inside node 0's namespace, where every node can reach
    it (over the shaped link, as a real cluster's); yields its address."""
    command = Path(sys.executable).with_name("torchft_lighthouse")
    if not command.exists():
        raise RuntimeError(f"torchft_lighthouse not found next to {sys.executable}")
    argv = [
        *cluster.exec_prefix(0), str(command), "--bind", f"0.0.0.0:{LIGHTHOUSE_PORT}",
        "--min_replicas", "1", "--join_timeout_ms", str(JOIN_TIMEOUT_MS),
        "--heartbeat_timeout_ms", str(HEARTBEAT_TIMEOUT_MS),
    ]  # fmt: skip
    with open(log_dir / "lighthouse.log", "wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=log, **popen_kwargs())
        try:
            yield f"http://{cluster.address(0)}:{LIGHTHOUSE_PORT}"
        finally:
            stop_processes([server], GRACE_S)


def _no_prefix(node: int) -> list[str]:
    return []


def _inside(cluster: EmulatedCluster, node: int) -> list[str]:
    """argv prefix that runs a command in ``node``'s namespace under a host name of its own.

    torchft advertises ``socket.gethostname()`` for its stores, managers and checkpoint
    servers. Every namespace shares the machine's host name, which resolves to loopback, so a
    node would dial itself to reach another. A UTS namespace whose host name is the node's
    address makes that name resolve to the node, with no hosts file to write and remove.
    """
    address = cluster.address(node)
    return [
        *cluster.exec_prefix(node), "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
        address, "env", *(f"{k}={v}" for k, v in sorted(cluster.env(node).items())),
    ]  # fmt: skip


def node_argv(
    node: int,
    ranks_per_node: int,
    program: list[str],
    *,
    lighthouse: str,
    max_restarts: int,
    prefix: Sequence[str] = (),
) -> list[str]:
    """argv of ``node``'s own torchrun: a one-node world, restarted on its own; ``prefix``
    places it (a namespace)."""
    return [
        *prefix, *agent.argv(),
        "--standalone", "--nnodes=1", f"--nproc-per-node={ranks_per_node}",
        f"--max-restarts={max_restarts}",
        *program, "--node-index", str(node), "--lighthouse", lighthouse,
    ]  # fmt: skip


def run_torchft_nodes(argvs: list[list[str]], *, log_dir: Path, tmp_dir: Path) -> list[int]:
    """Run every node's torchrun (``argvs``, node by node) to its end; return their exit codes.

    Unlike a static cluster, a failed node does not stop the others; output, signals and
    lifetime as :func:`deto.launch.shaped.node_processes`.
    """
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: each attempt's ranks get a fresh store (as in
    # deto.launch.local); torchft's manager of the node meets its ranks in that store
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "TMPDIR": str(tmp_dir),
    }  # fmt: skip
    with node_processes(argvs, log_dir, env) as procs:
        while any(p.poll() is None for p in procs):
            time.sleep(0.1)
        return [int(p.returncode) for p in procs]


def rank_pids(node: int) -> list[int]:
    """The pids of ``node``'s ranks on this machine, not its agent's (what a fault
    injection kills, or a monitor watches): the processes whose argv holds ``--node-index
    <node>`` (:func:`node_argv`) and is not torchrun's."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that just ended
            continue
        if (
            b"--node-index" in argv
            and agent.MODULE.encode() not in argv
            and argv[argv.index(b"--node-index") + 1 :][:1] == [str(node).encode()]
        ):
            pids.append(int(proc.name))
    return pids
