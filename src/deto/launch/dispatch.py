"""How ``deto train`` runs: which launch path, and what every rank enters.

Three paths lead to one per-rank entry, :func:`rank_entry`, which runs
:func:`deto.run.loop.run`:

* under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` set), this process is one
  rank of a real cluster and enters directly;
* otherwise :mod:`deto.launch.local` spawns a simulated cluster on this machine through
  torch's elastic launcher;
* with ``--bandwidth``, the emulated-link driver (:mod:`deto.launch.shaped`) puts each
  simulated node in its own network namespace and starts torch's launcher there; its ranks
  then take the torchrun path.

Bad input raises :class:`UsageError` before anything starts.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from deto import netem
from deto.launch import ftcluster, shaped
from deto.launch.failures import RankError, failure_line
from deto.launch.local import RankFailure, launch_local
from deto.launch.preflight import check_output_dir
from deto.proc.lifetime import die_with_parent
from deto.run import checkpoint, loop, snapshot
from deto.run.config import TrainConfig, load_toml, resolve
from deto.run.console import configure_logging
from deto.run.integrity import latest_usable, select_checkpoint
from deto.run.ranks import all_gather
from deto.topology import Topology

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
RESUME_AUTO = "auto"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own name for the Lighthouse's address
TORCHFT_LOGGERS = ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors")
"""torchft logs every quorum and commit at INFO, and warnings about NCCL on CPU; deto says what
matters (a failed attempt, a recovery) itself, so these show their errors only, or all with
-v."""
MAX_SIMULATED_RANKS = 64


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one rank of a torchrun (or other torch elastic) launch."""
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_ENV)


def train(
    flags: Mapping[str, Any],
    *,
    config_file: str | None,
    bandwidth: str | None,
    log_level: int,
) -> dict[str, Any] | None:
    """Run ``deto train`` with the settings of ``config_file`` overridden by ``flags``.

    Returns the summary when this process holds it (rank 0 under torchrun, the simulated
    cluster's launcher), else ``None``: another rank, or an emulated-link run, whose node 0
    prints the summary itself. Raises :class:`UsageError` for bad input,
    :class:`deto.launch.local.RankFailure` when a rank fails and ``RuntimeError`` when a node
    of an emulated cluster fails.
    """
    torchrun = under_torchrun()
    if torchrun and bandwidth is not None:
        raise UsageError(
            "--bandwidth emulates links between simulated nodes; under torchrun the links are real"
        )
    try:
        values = {**(load_toml(config_file) if config_file is not None else {}), **flags}
        if torchrun:
            values = (torchft_topology if values.get("ft") else torchrun_topology)(
                values, os.environ
            )
        cfg = resolve(values)
        if cfg.ft and not torchrun:  # every node resumes its own: check them all before starting
            for node in range(cfg.nodes):
                checkpoint_to_resume(cfg, node)
            resume = None
        else:
            resume = checkpoint_to_resume(cfg, cfg.node_index if cfg.ft else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.ft:
        check_torchft(cfg, torchrun=torchrun, bandwidth=bandwidth)

    if torchrun:
        if cfg.out is not None:
            _check_out(cfg.out)
        device = None if cfg.device == "auto" else cfg.device
        return rank_entry(cfg.to_dict(), cfg.out, resume, log_level, device)

    check_simulated(cfg)
    link = None if bandwidth is None else emulated_link(bandwidth, cfg.nodes)
    run_dir = cfg.out or loop.default_run_dir(cfg.scheme)
    _check_out(run_dir)
    logger.info(
        "deto train: %s on %s, %d node(s) x %d rank(s) simulated on this machine; output in %s",
        cfg.scheme, cfg.task, cfg.nodes, cfg.ranks_per_node, run_dir,
    )  # fmt: skip
    if cfg.ft:
        return ftcluster.train_on_torchft(
            values, cfg.nodes, cfg.ranks_per_node, Path(run_dir), log_level, link
        )
    if link is not None:
        shaped.train_over_emulated_links(
            values, link, cfg.nodes, cfg.ranks_per_node, Path(run_dir), log_level
        )
        return None
    try:
        results = launch_local(
            rank_entry, (cfg.to_dict(), run_dir, resume, log_level, "cpu"),
            world_size=cfg.world_size, max_restarts=cfg.max_restarts,
        )
    except RankFailure as exc:
        exc.write_log(Path(run_dir))
        raise
    summary = results.get(0)
    if summary is None:
        raise RuntimeError("rank 0 returned no summary")
    return summary


def torchrun_topology(values: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Take nodes x ranks-per-node from the torchrun environment; flags must agree with it."""
    world = int(env["WORLD_SIZE"])
    per_node = int(env["LOCAL_WORLD_SIZE"])
    if per_node < 1 or world % per_node:
        raise UsageError(
            f"Invalid topology: WORLD_SIZE={world} is not a multiple of "
            f"LOCAL_WORLD_SIZE={per_node}"
        )
    given = {"nodes": world // per_node, "ranks_per_node": per_node}
    for key, value in given.items():
        if key in values and values[key] != value:
            raise UsageError(
                f"Invalid topology: --{key.replace('_', '-')} {values[key]} disagrees with "
                f"torchrun's {given['nodes']} node(s) x {given['ranks_per_node']} rank(s)"
            )
    return {**values, **given}


def torchft_topology(values: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """With ``--ft`` each node is its own torchrun world: its ranks are the node's ranks, the
    nodes come from ``--nodes``, and the Lighthouse from ``$TORCHFT_LIGHTHOUSE`` if not given."""
    world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
    if world != per_node:
        raise UsageError(
            f"Invalid topology: --ft runs every node as its own world, but torchrun's world has "
            f"{world} ranks over several nodes; start torchrun with --nnodes 1 on every node"
        )
    if values.get("ranks_per_node", per_node) != per_node:
        raise UsageError(
            f"Invalid topology: --ranks-per-node {values['ranks_per_node']} disagrees with "
            f"torchrun's {per_node} rank(s)"
        )
    given: dict[str, Any] = {"ranks_per_node": per_node}
    if values.get("lighthouse") is None and env.get(LIGHTHOUSE_ENV):
        given["lighthouse"] = env[LIGHTHOUSE_ENV]
    return {**values, **given}


def check_torchft(cfg: TrainConfig, *, torchrun: bool, bandwidth: str | None) -> None:
    """What ``--ft`` needs besides the config: torchft, and under torchrun the node's seat."""
    if importlib.util.find_spec("torchft") is None:
        raise UsageError("--ft needs torchft: pip install 'deto[ft]'")
    if bandwidth is not None and shutil.which("unshare") is None:
        raise UsageError(
            "--ft with --bandwidth needs unshare (util-linux): every emulated node gets a host "
            "name of its own, which torchft advertises"
        )
    if torchrun and cfg.node_index is None:
        raise UsageError("--ft under torchrun needs --node-index (this node's place, 0 to "
                         f"{cfg.nodes - 1})")
    if torchrun and cfg.lighthouse is None:
        raise UsageError(f"--ft under torchrun needs --lighthouse or ${LIGHTHOUSE_ENV}")


def torchft_seat(cfg: TrainConfig) -> loop.JoinReplicas:
    """How a rank of a node on torchft joins the replicate axis (:class:`deto.ft.ReplicaAxis`),
    once its model and optimizer are built: the node's manager meets its ranks in torchrun's
    store, and a peer counts as gone after ``--timeout``."""

    def join(model: Any, opt: Any) -> Any:
        from deto.ft import ReplicaAxis

        if logger.getEffectiveLevel() > logging.DEBUG:  # torchft logs every step
            for name in TORCHFT_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)

        timeout = datetime.timedelta(seconds=cfg.timeout)
        return ReplicaAxis(
            model, opt, lighthouse=str(cfg.lighthouse), replica_id=f"node{cfg.node_index}",
            store_addr=os.environ["MASTER_ADDR"], store_port=int(os.environ["MASTER_PORT"]),
            group_rank=dist.get_rank(), group_world_size=dist.get_world_size(),
            timeout=timeout, quorum_timeout=timeout,
        )  # fmt: skip

    return join


def _check_out(run_dir: str) -> None:
    try:
        check_output_dir(run_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def checkpoint_to_resume(cfg: TrainConfig, node: int | None = None) -> str | None:
    """The checkpoint ``--resume`` names, verified against its manifest and checked against
    ``cfg``; ``ValueError`` (one line) if there is none, none is whole, or it does not fit.

    ``--resume auto`` continues from the newest whole checkpoint in ``--out``, or starts
    afresh when there is none yet. Newer checkpoints that fail verification are passed over
    with a warning. With ``--ft`` every node keeps its own checkpoints: ``node``'s are in its
    folder of the run directory (``--out``, or the one ``--resume`` names).
    """
    if cfg.resume is None:
        return None
    where = cfg.out if cfg.resume == RESUME_AUTO else cfg.resume
    if node is not None and where is not None:
        where = os.path.join(where, loop.node_dir(node))
    if cfg.resume == RESUME_AUTO:
        selection = latest_usable(where) if where is not None else None
        if selection is None:
            logger.info("--resume auto: no checkpoint in %s yet, starting afresh", where)
            return None
    else:
        selection = select_checkpoint(str(where))
    for skipped in selection.skipped:
        logger.warning("passing over a damaged checkpoint: %s", skipped)
    checkpoint.check_resumable(selection.path, cfg)
    return str(selection.path)


def restarted_anywhere() -> bool:
    """Whether torch elastic restarted any rank of the world (a collective).

    Each node's agent counts its own restarts (``TORCHELASTIC_RESTART_COUNT``): when one node's
    ranks fail, the others are restarted for the new rendezvous round without counting it, so
    one rank's count alone would let some ranks start afresh while others resume.
    """
    return max(all_gather(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))) > 0


def resume_after_restart(run_dir: str | None, resume: str | None, restarted: bool) -> str | None:
    """What the ranks continue from once torch elastic restarted any of them: the newest whole
    checkpoint of the run, else what the first attempt resumed from."""
    if not restarted:
        return resume
    if run_dir is None:
        logger.warning("restarted without --out: no checkpoint to continue from")
        return resume
    selection = latest_usable(run_dir)
    if selection is None:
        return resume
    for skipped in selection.skipped:
        logger.warning("passing over a damaged checkpoint: %s", skipped)
    return str(selection.path)


def snapshot_after_restart(
    cfg: TrainConfig, run_dir: str | None, resume: str | None, restarted: bool
) -> int | None:
    """The step of the in-memory snapshot the restarted ranks continue from, when every rank
    holds one newer than the checkpoint ``resume`` (a collective). A run that was not restarted
    drops the snapshots an earlier run of ``run_dir`` may have left."""
    if not cfg.snapshot_every or run_dir is None:
        return None
    if not restarted:
        snapshot.drop_snapshots(run_dir)
        return None
    step = snapshot.newest_common_step(run_dir)
    if step is None or (resume is not None and step <= checkpoint.checkpoint_step(Path(resume))):
        return None
    return step


def check_simulated(cfg: TrainConfig) -> None:
    """A simulated cluster runs on this machine's CPU, with a bounded number of ranks."""
    if cfg.device == "cuda":
        raise UsageError(
            "Invalid device: 'cuda' (the simulated cluster runs on CPU; use torchrun for GPUs)"
        )
    if cfg.world_size > MAX_SIMULATED_RANKS:
        raise UsageError(
            f"Invalid topology: {cfg.nodes} x {cfg.ranks_per_node} = {cfg.world_size} ranks is "
            f"too many to simulate on one machine (at most {MAX_SIMULATED_RANKS}); use torchrun"
        )
    cpus = os.cpu_count() or 1
    if cfg.world_size > 2 * cpus:
        logger.warning("%d ranks on %d CPU core(s): expect a slow run", cfg.world_size, cpus)


def emulated_link(bandwidth: str, nodes: int) -> netem.LinkSpec:
    """The :class:`deto.netem.LinkSpec` of ``--bandwidth``, once this machine is known to
    be able to emulate it for ``nodes`` nodes."""
    try:
        link = netem.LinkSpec.from_text(bandwidth)
        if nodes < 2:
            raise ValueError(f"--bandwidth needs at least 2 nodes, got {nodes}")
        netem.check_requirements(nodes)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    return link


def rank_entry(
    cfg_dict: dict[str, Any],
    run_dir: str | None,
    resume: str | None,
    log_level: int,
    device: str | None,
) -> dict[str, Any] | None:
    """What every rank runs, spawned for a simulated cluster or started by torchrun.

    The rank dies with the process that started it (a launcher killed with -9 leaves no rank
    behind). A failure leaves as a :class:`RankError`: one line naming node, rank and cause.
    """
    die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    cfg = TrainConfig.from_dict(cfg_dict)
    if cfg.ft:  # the node's own world; its place on the replicate axis is --node-index
        node, rank = cfg.node_index or 0, rank + (cfg.node_index or 0) * cfg.ranks_per_node
    else:
        node = rank // cfg.ranks_per_node
    configure_logging(log_level, rank=rank)
    topo = Topology(
        nodes=1 if cfg.ft else cfg.nodes, ranks_per_node=cfg.ranks_per_node, device=device,
        timeout=cfg.timeout,
    )  # fmt: skip
    own_dir = run_dir  # where this rank's checkpoints and snapshots are
    if cfg.ft and run_dir is not None:
        own_dir = os.path.join(run_dir, loop.node_dir(node))
    try:
        topo.init()
        if cfg.ft and resume is None:  # a simulated node resolves its own (torchrun: train())
            resume = checkpoint_to_resume(cfg, node)
        restarted = restarted_anywhere()  # with --ft: within the node
        resume = resume_after_restart(own_dir, resume, restarted)
        from_snapshot = snapshot_after_restart(cfg, own_dir, resume, restarted)
        if restarted:
            where = resume or "the start (no checkpoint yet)"
            if from_snapshot is not None:
                where = f"the in-memory snapshot of step {from_snapshot}"
            logger.warning("restarted: continuing from %s", where)
        return loop.run(
            cfg, topo, run_dir=run_dir, resume=resume, snapshot_step=from_snapshot,
            join_replicas=torchft_seat(cfg) if cfg.ft else None,
        )  # fmt: skip
    except KeyboardInterrupt:
        # the launcher forwards the terminal's Ctrl-C: leave quietly, once
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:
        line = failure_line(node, rank, exc, cfg.timeout)
        raise RankError(line) from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
