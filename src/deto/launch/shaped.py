"""The emulated-link driver: a simulated cluster whose nodes live in network namespaces.

Each node runs torch's own multi-node launcher (``python -m torch.distributed.run``) inside its
namespace, with a static rendezvous at node 0's address: exactly the path of a real multi-node
run, only the wire is a shaped veth link. Ranks of a node talk over the namespace's loopback
(unshaped); ranks of different nodes cross the shaped link. Every rank enters ``deto train``
as under torchrun and reads the run's settings from ``<out>/train.toml``; when the nodes are
done, the driver records how the link was emulated in the run's ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from deto.launch import agent
from deto.launch.failures import PEER_GONE, TIMEOUT, cause_of
from deto.netem import (
    EmulatedCluster,
    LinkSpec,
    cleanup_stale,
    format_bandwidth,
    verify_shaping,
)
from deto.proc.lifetime import popen_kwargs
from deto.proc.processes import sigterm_raises, stop_processes
from deto.run import report

logger = logging.getLogger(__name__)

RENDEZVOUS_PORT = 29500  # the namespaces are fresh, so the port is free in node 0's
GRACE_S = 10.0


def train_over_emulated_links(
    values: Mapping[str, Any],
    link: LinkSpec,
    nodes: int,
    ranks_per_node: int,
    out: Path,
    log_level: int,
) -> None:
    """Run ``deto train`` with ``values`` on ``nodes`` namespaces of ``ranks_per_node`` ranks,
    joined by links shaped to ``link``; then write the link's description into the run's
    ``summary.json``.

    Raises ``RuntimeError`` when the link is not what was asked for or a node fails.
    """
    program = rank_program(values, out, log_level)
    restarts = int(values.get("max_restarts") or 0)
    with emulated_cluster(nodes, link) as cluster, tempfile.TemporaryDirectory(
        prefix="deto-agents-"
    ) as tmp:
        code = run_nodes(
            cluster, ranks_per_node, program, log_dir=out / "logs", tmp_dir=Path(tmp),
            max_restarts=restarts,
        )
        description = cluster.describe()
    if code != 0:
        raise RuntimeError(node_failure(out / "logs", code))
    summary = json.loads((out / "summary.json").read_text())
    summary["link"] = description
    report.write_json(out / "summary.json", summary)
    logger.debug("summary: %s", report.format_table(summary))


@contextlib.contextmanager
def emulated_cluster(nodes: int, link: LinkSpec) -> Iterator[EmulatedCluster]:
    """An :class:`EmulatedCluster` whose link was measured to be ``link`` (``RuntimeError``
    if not), after removing what earlier runs killed with -9 left behind."""
    removed = cleanup_stale()
    if removed:
        logger.info("removed %d namespace(s) left by earlier runs", len(removed))
    with EmulatedCluster(nodes, link) as cluster:
        check = verify_shaping(cluster)
        if not check.ok:
            raise RuntimeError(f"the emulated link is not what was asked for: {check.note}")
        logger.info(
            "link %s verified: probe measured %.1f Mbit/s",
            format_bandwidth(link.bandwidth_bps), check.measured_bps / 1e6,
        )
        yield cluster


ERROR_PREFIX = "deto train: error: "


def node_failure(log_dir: Path, code: int) -> str:
    """One line for a shaped run whose node exited with ``code``: the cause a failing rank told
    in its node's log (node, rank, what to do), else where to look."""
    told = []
    for log in sorted(log_dir.glob("node*.log")):
        lines = log.read_text(errors="replace").splitlines()
        told += [ln[len(ERROR_PREFIX):] for ln in lines if ln.startswith(ERROR_PREFIX)]
    if told:  # a cause before its consequences: the peers that saw a connection close
        first = min(told, key=lambda line: cause_of(line) in (PEER_GONE, TIMEOUT))
        return f"{first} (logs of nodes 1 and up: {log_dir})"
    return f"a node exited with status {code} (node 0's output is above; the others': {log_dir})"


def rank_program(values: Mapping[str, Any], out: Path, log_level: int) -> list[str]:
    """What every rank of a launched node runs: ``-m deto train`` with ``values`` written to
    ``<out>/train.toml`` (settings too many for a command line, and a record of the run)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {**values, "out": str(out)}
    (out / "train.toml").write_text(
        "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items() if v is not None)
    )
    verbosity = {logging.DEBUG: ["-v"], logging.WARNING: ["-q"]}.get(log_level, [])
    return ["-m", "deto", "train", "--config", str(out / "train.toml"), *verbosity]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_argv(
    cluster: EmulatedCluster,
    node: int,
    ranks_per_node: int,
    program: list[str],
    *,
    tmp_dir: Path | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """argv that starts ``node``'s launcher agent inside its namespace.

    ``program`` is what torchrun runs on every rank, e.g. ``["-m", "deto", "train", ...]``.
    ``tmp_dir`` becomes the agent's ``TMPDIR``: torch elastic's ``torchelastic_*`` folders and
    error files land there, and go with it. ``max_restarts``: torchrun's restarts of the node's
    ranks after a failure.
    """
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: each attempt's ranks get a fresh store, so restarted
    # ranks never read a dead attempt's gloo addresses (as in deto.launch.local)
    env = {
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **cluster.env(node),
    }
    if tmp_dir is not None:
        env["TMPDIR"] = str(tmp_dir)
    # c10d rendezvous, not static: when one node's ranks fail, every node's agent joins a new
    # round and restarts its ranks together. Node 0's agent hosts the store (inside a namespace
    # torch cannot tell that node 0's address is its own); ranks are given in the order of the
    # agents' addresses as strings, so node 0 keeps ranks 0.. (and up to 10 nodes keep order)
    return [
        *cluster.exec_prefix(node),
        "env",
        *(f"{k}={v}" for k, v in sorted(env.items())),
        *agent.argv(),
        f"--nnodes={cluster.nodes}",
        f"--nproc-per-node={ranks_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={cluster.address(0)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id=deto-{cluster.run_id}",
        f"--rdzv-conf=is_host={str(node == 0).lower()}",
        f"--local-addr={cluster.address(node)}",
        f"--max-restarts={max_restarts}",
        *program,
    ]


def run_nodes(
    cluster: EmulatedCluster,
    ranks_per_node: int,
    program: list[str],
    *,
    log_dir: Path,
    tmp_dir: Path | None = None,
    max_restarts: int = 0,
) -> int:
    """Run ``program`` on every rank of every node; return the first failing exit code or 0.

    When one node fails, the others are stopped; for the rest see :func:`node_processes`.
    """
    argvs = [
        node_argv(cluster, node, ranks_per_node, program, tmp_dir=tmp_dir,
                  max_restarts=max_restarts)
        for node in range(cluster.nodes)
    ]  # fmt: skip
    with node_processes(argvs, log_dir) as procs:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                bad = codes.index(failed[0])
                logger.error("node %d exited with status %d; stopping the others", bad, failed[0])
                stop_processes(procs, GRACE_S, process_group=True)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)


@contextlib.contextmanager
def node_processes(
    argvs: list[list[str]], log_dir: Path, env: Mapping[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start one launcher per node (``argvs``, node by node) and yield them.

    Node 0's output goes to this terminal (its rank 0 draws the progress bar); the other nodes'
    go to ``log_dir/node<i>.log``. Each runs in its own session, so that stopping it stops its
    ranks. An exception in the block (Ctrl-C, and SIGTERM as ``SystemExit(143)``) stops every
    node before it propagates, so no rank outlives its namespace; the launchers die with this
    process even when it is killed with -9 (:func:`deto.proc.lifetime.popen_kwargs`), and
    their ranks with them.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    with sigterm_raises():
        try:
            for node, argv in enumerate(argvs):
                out = None
                if node:
                    out = open(log_dir / f"node{node}.log", "wb")  # noqa: SIM115 - closed below
                    logs.append(out)
                procs.append(subprocess.Popen(
                    argv, stdout=out, stderr=out, env=env, start_new_session=True,
                    **popen_kwargs(),
                ))  # fmt: skip
            yield procs
        except BaseException:
            stop_processes(procs, GRACE_S, process_group=True)
            raise
        finally:
            for f in logs:
                f.close()
