"""Where every rank sits: ``nodes x ranks_per_node`` and the 2-D device mesh over them.

The mesh has two axes with two owners: ``replicate`` (size = nodes; rank i of every node, the
slow network) belongs to the replicators, ``shard`` (size = ranks per node; the fast links
inside a node) belongs to FSDP2. Rank ``node * ranks_per_node + local`` is at ``[node, local]``.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deto._validate import check_float, check_int

MESH_DIMS = ("replicate", "shard")
DEFAULT_TIMEOUT_S = 60.0
"""Collective timeout: long enough for a slow link's largest exchange, short enough that a
silent peer (a hung host, a dead link) stops the run in a minute, not torch's 10-30."""
MIN_TIMEOUT_S = 1e-3
"""The shortest collective timeout: torch counts it in whole milliseconds, and a timeout that
rounds to 0 ms there means no timeout at all."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""The longest collective timeout: a week, beyond any exchange or checkpoint save. Finite,
because the timeout becomes a ``datetime.timedelta`` (at most 1e9 days) and torch's millisecond
clocks: ``--timeout 1e20`` overflowed there, on every rank, after the launch."""
TIMEOUT_ENV = "DETO_TIMEOUT"
NODES_ENV = "DETO_NODES"


@dataclass(frozen=True)
class Topology:
    """The cluster shape. The device type (and so the backend) is derived, never hard-coded.

    Args:
        nodes: number of nodes (R), the size of the ``replicate`` axis.
        ranks_per_node: accelerators per node (S), the size of the ``shard`` axis.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available, else CPU).
        timeout: seconds a collective may wait for a peer before it fails, on the world and
            on both mesh axes (torch's default is 10 minutes for NCCL, 30 for gloo); at most
            :data:`MIN_TIMEOUT_S` to :data:`MAX_TIMEOUT_S`.
    """

    nodes: int
    ranks_per_node: int = 1
    device: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        check_int("nodes", self.nodes, 1)
        check_int("ranks_per_node", self.ranks_per_node, 1)
        check_float("timeout", self.timeout, MIN_TIMEOUT_S, MAX_TIMEOUT_S)
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError):
                kind = None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"Invalid device: {self.device!r} (expected 'cpu' or 'cuda')")

    @classmethod
    def from_env(cls, device: str | None = None, nodes: int | None = None) -> Topology:
        """Read the shape of a torchrun launch (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``) and the
        collective timeout in seconds from ``DETO_TIMEOUT`` (default 60).

        ``nodes`` (or ``DETO_NODES``) splits the world into that many *simulated* nodes of
        consecutive ranks, the layout ``deto train`` uses on one machine: ``torchrun
        --nproc-per-node 4`` with ``DETO_NODES=2`` is 2 nodes x 2 ranks, and what crosses
        between them is counted (and shaped, under ``deto train --bandwidth``) as inter-node
        traffic. Without it, every machine is one node.
        """
        try:
            world = int(os.environ["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise ValueError(
                "WORLD_SIZE is not set: launch with torchrun or use Topology(...)"
            ) from None
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_machine < 1 or world % per_machine:
            raise ValueError(
                f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_machine}"
            )
        if nodes is None:
            nodes = nodes_from_env()
        if nodes is None:
            nodes = world // per_machine
        check_int("nodes", nodes, 1)
        if world % nodes or per_machine % (world // nodes):
            raise ValueError(
                f"Invalid nodes: {nodes} (a world of {world} ranks, {per_machine} per machine, "
                f"splits into simulated nodes only where {world} // nodes divides {per_machine}; "
                f"set {NODES_ENV} to a divisor)"
            )
        return cls(
            nodes=nodes,
            ranks_per_node=world // nodes,
            device=device,
            timeout=timeout_from_env(),
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def device_type(self) -> str:
        if self.device is not None:
            return torch.device(self.device).type
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def collective_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout)

    def init(self, timeout: datetime.timedelta | None = None) -> DeviceMesh:
        """Initialise the default process group if needed, check the world, build the mesh.

        ``timeout`` overrides :attr:`timeout` for every group (the world and both axes).
        """
        timeout = timeout or self.collective_timeout
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=timeout)
        world = dist.get_world_size()
        if world != self.world_size:
            raise ValueError(
                f"World size {world} does not equal nodes x ranks_per_node = "
                f"{self.nodes} x {self.ranks_per_node} = {self.world_size}"
            )
        if self.device_type == "cuda":
            # torchrun's LOCAL_RANK is this process's index on its machine; several simulated
            # nodes on one machine must not share a GPU, so the mesh position is only a fallback
            local = int(os.environ.get("LOCAL_RANK", self.local_rank))
            torch.cuda.set_device(local % torch.cuda.device_count())
        mesh = self.mesh
        if timeout != self.collective_timeout:
            _set_timeouts(mesh, timeout)
        return mesh

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    @property
    def torch_device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @functools.cached_property
    def mesh(self) -> DeviceMesh:
        if not dist.is_initialized():
            raise RuntimeError("Call Topology.init() (or deto.prepare) before using the mesh")
        mesh = init_device_mesh(
            self.device_type, (self.nodes, self.ranks_per_node), mesh_dim_names=MESH_DIMS
        )
        _set_timeouts(mesh, self.collective_timeout)
        return mesh


def nodes_from_env(env: dict[str, str] | None = None) -> int | None:
    """The simulated node count from ``DETO_NODES``, or ``None`` when it is not set."""
    text = (os.environ if env is None else env).get(NODES_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"Invalid {NODES_ENV}: {text!r} (expected a node count, e.g. 2)") from None
    return check_int(NODES_ENV, value, 1)


def timeout_from_env(env: dict[str, str] | None = None) -> float:
    """The collective timeout in seconds from ``DETO_TIMEOUT``, or the default."""
    text = (os.environ if env is None else env).get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"Invalid {TIMEOUT_ENV}: {text!r} (expected seconds, e.g. 60)") from None
    return check_float(TIMEOUT_ENV, value, MIN_TIMEOUT_S, MAX_TIMEOUT_S)


def _set_timeouts(mesh: DeviceMesh, timeout: datetime.timedelta) -> None:
    """The mesh's axis groups are created without the world's timeout (torch gives them its
    own default); set it on each, so no axis waits longer than the world."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for dim in MESH_DIMS:
        _set_pg_timeout(timeout, mesh.get_group(dim))
