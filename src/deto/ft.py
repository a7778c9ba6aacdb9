"""The replicate axis on torchft: a node may die and rejoin while the other nodes keep training.

Every node is a torchft *replica group*. Its ranks keep their own torch.distributed world for
the fast links (FSDP2 over the ``shard`` axis, as in a static run), and rank *i* of every node
joins a reconfigurable torchft ``ProcessGroupGloo`` that takes the place of
``mesh["replicate"]``. Before every step each rank's torchft ``Manager`` asks the Lighthouse
for a quorum: when a node is gone the quorum shrinks and the survivors go on among themselves;
a node that (re)joins fetches the parameters and optimizer state of a live peer at the same
shard position before its first step (live recovery), so the survivors never roll back.

:class:`FTComm` is :class:`deto.comm.Comm` on that group; the replicators see no difference
except that ``size`` may change between steps. A collective that fails raises
:class:`ReplicaGroupFailure`, which ends the optimizer step before the base optimizer runs.
:class:`ReplicaAxis.step` then restores the state from before the step, the step is not
committed, and it is tried again with the nodes that are left: a failed attempt leaves no trace.

What a joining node takes from its peer, and what it does not: parameters, the base optimizer's
state, the step and every replicator's shared state (DiLoCo's anchor and outer momentum) are
the same on every node, so they are copied. The node-local residuals (DeMo's and the row-subset
schemes' decoupled momentum ``delta``, Full's ``pending`` sum, the error feedback ``error`` of a
compressed DiLoCo such as SparseLoCo) are each node's own unsent gradient; a copy would send
the peer's residual twice, so the joiner starts them at zero, like a node at step 0. The dead
node's residual is lost with it.

torchft is an optional dependency (``pip install deto[ft]``); importing this module without it
raises ``ImportError`` with that hint.
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from deto.comm import (
    Comm,
    CommStats,
    all_gather_bytes,
    all_reduce_bytes,
    broadcast_bytes,
)
from deto.compress.packing import pack, unpack
from deto.optim import DecoupledOptimizer
from deto.optim_state import is_deto_key
from deto.replicators.base import local_tensor
from deto.replicators.demo import DeMo

try:
    from torchft import Manager, ProcessGroupGloo
    from torchft._torchft import LighthouseServer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("deto.ft needs torchft: pip install 'deto[ft]' (torchft-nightly)") from exc

logger = logging.getLogger(__name__)

NODE_LOCAL_STATE = ("delta", "pending", "error")
"""Replicator state keys that hold a node's own unsent gradient (reset when a node joins):
DeMo's and the row-subset schemes' momentum, Full's pending sum, compressed DiLoCo's error
feedback."""


class ReplicaGroupFailure(RuntimeError):
    """A collective over the replicate axis failed (a peer died or went silent)."""


class FTComm(Comm):
    """Collectives over torchft's managed replicate group, coalesced and counted like
    :class:`Comm`. ``size`` and ``rank`` are the current quorum's, refreshed by
    :meth:`refresh` at the start of every step."""

    def __init__(self, manager: Manager, pg: ProcessGroupGloo) -> None:
        self.manager = manager
        self.pg = pg
        self._size = 1
        self._rank = 0
        self._stats = CommStats()

    @property
    def size(self) -> int:
        """Number of nodes in the current quorum."""
        return self._size

    @property
    def rank(self) -> int:
        """This node's place in the current quorum."""
        return self._rank

    def refresh(self) -> None:
        """Read the quorum's size and this node's place in it (after ``start_quorum``)."""
        self._size = max(1, self.manager.num_participants())
        self._rank = self.manager.participating_rank() or 0

    def all_gather_async(self, tensors: list[torch.Tensor]) -> Any:
        raise NotImplementedError(
            "FTComm gathers synchronously: DeMo(overlap=True) and StreamingDiLoCo(overlap_steps"
            ">0) are not supported on torchft yet"
        )

    def all_reduce_mean_async(self, tensors: list[torch.Tensor]) -> Any:
        raise NotImplementedError(
            "FTComm all-reduces synchronously: Full(overlap=True) and StreamingDiLoCo("
            "overlap_steps>0) are not supported on torchft yet"
        )

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:  # gloo raises on a closed connection or a timeout
            self.manager.report_error(exc)
            raise ReplicaGroupFailure(f"{what} over the replicate axis failed: {exc}") from exc
        if self.manager.errored() is not None:
            raise ReplicaGroupFailure(
                f"{what} over the replicate axis failed: {self.manager.errored()}"
            )

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not tensors:
            return []
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise TypeError("all_reduce_mean needs tensors of one dtype")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if self.size > 1:
            start = time.perf_counter()
            self._wait(self.manager.allreduce(flat), "all-reduce")  # AVG over the quorum
            self._count(all_reduce_bytes(flat.numel() * flat.element_size(), self.size), start)
        sizes = [t.numel() for t in tensors]
        return [c.view_as(t) for c, t in zip(flat.split(sizes), tensors, strict=True)]

    def all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        if self.size == 1:
            return [list(tensors)]
        buffer, specs = pack(tensors)
        if buffer.numel() == 0:
            return [unpack(buffer, specs) for _ in range(self.size)]
        start = time.perf_counter()
        parts = [buffer.new_empty(buffer.numel()) for _ in range(self.size)]
        self._wait(self.pg.allgather([parts], [buffer], _allgather_options()), "all-gather")
        self._count(all_gather_bytes(buffer.numel(), self.size), start)
        return [unpack(part, specs) for part in parts]

    def broadcast(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        if self.size == 1 or not tensors:
            return
        start = time.perf_counter()
        buffer, specs = pack(tensors)
        self._wait(self.pg.broadcast_one(buffer, src), "broadcast")
        for t, new in zip(tensors, unpack(buffer, specs), strict=True):
            t.copy_(new)
        self._count(broadcast_bytes(buffer.numel(), self.size), start)


def _allgather_options() -> Any:
    from torch.distributed.distributed_c10d import AllgatherOptions

    return AllgatherOptions()


# --------------------------------------------------------------------------------------------
# The state a joining node fetches, and the snapshot a failed step is rolled back to


def replica_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's parameters and optimizer state as plain (local-shard) tensors, copied."""
    return {
        "params": {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()},
        "optimizer": copy.deepcopy(_to_local(opt.state_dict())),
    }


def load_replica_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], *, joining: bool
) -> None:
    """Load :func:`replica_state` into ``model`` and ``opt``; ``joining`` resets the
    node-local residuals (see the module docstring)."""
    params = dict(model.named_parameters())
    if set(params) != set(state["params"]):
        raise ValueError("replica state holds other parameters than this model's")
    with torch.no_grad():
        for name, p in params.items():
            local_tensor(p).copy_(state["params"][name])
    opt.load_state_dict(_like_params(state["optimizer"], opt))
    if joining and isinstance(opt, DecoupledOptimizer):
        for rep in opt.replicators:
            # DeMo's ``pending`` is the aggregate every node applies next (the peer's is this
            # node's too); Full's is this node's own unsent gradient sum
            own = ("delta",) if isinstance(rep, DeMo) else NODE_LOCAL_STATE
            for st in rep.state:
                for key in own:
                    if key in st:
                        st[key].zero_()


def _to_local(tree: Any) -> Any:
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: _to_local(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_local(v) for v in tree]
    return tree


def _like_params(sd: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Re-wrap the base optimizer's per-parameter state as DTensors where the parameter is one
    (a torch optimizer's state must match its parameter's type)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for index, entry in sd.get("state", {}).items():
        p = params[int(index)]
        if not isinstance(p, DTensor):
            continue
        for key, value in entry.items():
            if (
                not is_deto_key(key)  # deto's buffers load from local tensors as they are
                and isinstance(value, torch.Tensor)
                and value.shape == p.to_local().shape
                and value.dim()
            ):
                entry[key] = DTensor.from_local(
                    value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
    return sd


# --------------------------------------------------------------------------------------------
# A node's seat on the replicate axis


class ReplicaAxis:
    """One rank's torchft manager, its replicate group and the :class:`FTComm` over it.

    Attaches the comm to ``opt`` (a :class:`DecoupledOptimizer`), so the replicators talk over
    the managed group. Drive each step with :meth:`step`.

    Args:
        model, opt: this rank's (sharded) model and deto optimizer.
        lighthouse: the Lighthouse address (``http://host:port``).
        replica_id: this node's name, the same on all its ranks (e.g. ``"node1"``).
        store_addr, store_port: the node's own TCPStore (torchrun's ``MASTER_ADDR``/``PORT``).
        group_rank, group_world_size: this rank's place inside its node.
        timeout: how long a collective or a recovery may take before the peer counts as dead.
        quorum_timeout: how long to wait for a quorum.
        min_replicas: fewest nodes with which a step may commit.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: DecoupledOptimizer,
        *,
        lighthouse: str,
        replica_id: str,
        store_addr: str,
        store_port: int,
        group_rank: int = 0,
        group_world_size: int = 1,
        timeout: datetime.timedelta = datetime.timedelta(seconds=60),
        quorum_timeout: datetime.timedelta = datetime.timedelta(seconds=60),
        min_replicas: int = 1,
    ) -> None:
        self.model = model
        self.opt = opt
        self.pg = ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(
            pg=self.pg,
            load_state_dict=self._load,
            state_dict=lambda: replica_state(model, opt),
            min_replica_size=min_replicas,
            use_async_quorum=False,  # heal before the step, so every participant steps alike
            init_sync=False,  # every node builds the same seeded model: step 0 needs no sync
            timeout=timeout,
            quorum_timeout=quorum_timeout,
            connect_timeout=timeout,
            rank=group_rank,
            world_size=group_world_size,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=lighthouse,
            replica_id=replica_id,
        )
        self.comm = FTComm(self.manager, self.pg)
        opt.comm = self.comm
        self._start_step = 0  # the step this node started from (start_at)
        self.healed = 0  # times this rank fetched its state from a peer
        self.failed = 0  # step attempts not committed

    def _load(self, state: dict[str, Any]) -> None:
        load_replica_state(self.model, self.opt, state, joining=True)
        self.healed += 1

    def start_at(self, step: int) -> None:
        """Continue from a checkpoint or snapshot of ``step`` (loaded into model and optimizer
        before). At the first quorum the nodes that resumed older state heal from the newest."""
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        self._start_step = step

    @property
    def step_number(self) -> int:
        """Committed steps so far (the same on every node of the quorum)."""
        return int(self.manager.current_step())

    @property
    def participants(self) -> int:
        return self.comm.size

    def step(self, run: Callable[[int], None], *, min_nodes: int = 1) -> bool:
        """One attempt at the next step: quorum (and recovery), ``run(step)``, commit.

        ``run`` does the forward, backward and ``opt.step()`` for step number ``step`` (the
        committed steps so far). Returns whether the step committed; if not, model and
        optimizer are as before the attempt, and the caller tries the same step again.

        ``min_nodes``: while this node is still at the step it started from (0, or the one it
        resumed), an attempt whose quorum has fewer nodes does not run ``run`` and is not
        committed (the participants are all at that step, see the same quorum and skip it
        alike), so that a run or a resumed run starts with every node rather than with the
        first one the Lighthouse heard from. Once a step is committed, or a recovery moved this
        node to its peers' step, it no longer applies: the survivors never wait for a late
        node.
        """
        self.manager.start_quorum()
        self.comm.refresh()
        if self.comm.size < min_nodes and self.step_number == self._start_step:
            self.manager.report_error(
                RuntimeError(f"waiting for {min_nodes} nodes, {self.comm.size} present")
            )
            self.manager.should_commit()
            return False
        before = replica_state(self.model, self.opt)
        try:
            run(self.step_number)
        except ReplicaGroupFailure as exc:
            logger.warning("step %d: %s; retrying with the nodes left", self.step_number, exc)
        committed = bool(self.manager.should_commit())
        if not committed:
            self.failed += 1
            load_replica_state(self.model, self.opt, before, joining=False)
            self.model.zero_grad(set_to_none=True)  # an attempt that failed in its step kept them
        return committed

    def identical(self, digest: bytes) -> bool:
        """Whether every node of the quorum holds ``digest`` (of this rank's shards): a
        collective over the replicate axis, called by every node after the same step."""
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        return all(torch.equal(part[0], mine) for part in self.comm.all_gather([mine]))

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def start_lighthouse(
    bind: str = "127.0.0.1:0",
    *,
    min_replicas: int = 1,
    join_timeout_ms: int = 1000,
    heartbeat_timeout_ms: int = 5000,
) -> LighthouseServer:
    """An in-process Lighthouse (the ``torchft_lighthouse`` command runs the same server).

    ``join_timeout_ms``: how long a quorum waits for nodes that are alive but late;
    ``heartbeat_timeout_ms``: silence after which a node counts as gone.
    """
    return LighthouseServer(
        bind=bind,
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )
