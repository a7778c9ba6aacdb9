"""The only module that issues collectives across nodes, and the one place bytes are counted.

Every collective runs on the ``replicate`` process group (rank i of every node). Bytes follow
the ring model for every scheme alike, per rank of the group with ``R`` members and a payload
of ``n`` bytes:

* all-reduce: ``2 (R - 1) / R * n`` sent and as many received (reduce-scatter + all-gather);
* all-gather: ``(R - 1) * n`` sent and received (each rank forwards the others' payloads);
* broadcast: ``(R - 1) / R * n`` sent and received on average (pipelined ring).

Bytes are integers rounded up, so a count is never below what crossed the wire.

:class:`Comm` does the coalescing and the counting; moving the bytes is a :class:`Transport`'s
job: :class:`DistTransport` over a ``torch.distributed`` group here, an in-memory one in
:mod:`deto.testing`, so simulated nodes count exactly what real ones do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.distributed as dist

from deto.compress.packing import TensorSpec, pack, unpack


@dataclass
class CommStats:
    """Inter-node traffic of one optimizer step (or a sum of steps).

    ``bytes_sent``/``bytes_received`` and ``collectives`` are this rank's; ``node_bytes_sent``
    and ``node_bytes_received`` add up every rank of this node (each rank talks across the
    network about its own shard only, so a node's traffic is the sum over its ranks).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    seconds: float = 0.0
    node_bytes_sent: int = 0
    node_bytes_received: int = 0
    nonfinite_skipped: int = 0

    def __add__(self, other: CommStats) -> CommStats:
        return CommStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def all_reduce_bytes(nbytes: int, group_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return math.ceil(2 * (group_size - 1) * nbytes / group_size)


def all_gather_bytes(nbytes: int, group_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-gather of ``nbytes`` per rank."""
    return (group_size - 1) * nbytes


def broadcast_bytes(nbytes: int, group_size: int) -> int:
    """Bytes one rank sends (and receives), on average, in a pipelined ring broadcast."""
    return math.ceil((group_size - 1) * nbytes / group_size)


class Transport(Protocol):
    """Moves one flat buffer between the nodes; every node calls each method in the same order."""


    size: int  # number of nodes
    rank: int  # this node's position among them

    def all_reduce_sum(self, flat: torch.Tensor, async_op: bool = False) -> Any:
        """Replace ``flat`` by its sum over the nodes, the same bytes on every node.

        With ``async_op`` it may return a handle whose ``wait()`` finishes the sum (``None``
        when it has finished already).
        """

    def all_gather(self, out: torch.Tensor, buffer: torch.Tensor, async_op: bool = False) -> Any:
        """Fill ``out`` (``size`` times ``buffer``'s length) with every node's ``buffer``.

        With ``async_op`` it may return a handle whose ``wait()`` finishes the gather (``None``
        when it has finished already).
        """

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        """Overwrite ``buffer`` with node ``src``'s."""


# torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class DistTransport:
    """A :class:`Transport` over a ``torch.distributed`` process group."""

    def __init__(self, group: dist.ProcessGroup | None, size: int | None = None) -> None:
        self.group = group
        self.size = size if size is not None else dist.get_world_size(group)
        self.rank = dist.get_rank(group) if group is not None else 0

    def all_reduce_sum(self, flat: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_reduce(flat, group=self.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, buffer: torch.Tensor, async_op: bool = False) -> Any:
        return _all_gather_single(out, buffer, group=self.group, async_op=async_op)

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        dist.broadcast(buffer, group_src=src, group=self.group)


class _InFlight:
    """A collective in flight: :meth:`finish` waits for it once, counting the wait.

    Where it runs, by backend. gloo runs the collective on its own thread; ``wait()`` blocks
    the host until it is done. NCCL launches it on its own stream, which first waits for the
    compute stream's work queued so far (so the send buffer written there is complete), and
    then runs beside the next step's kernels; ``wait()`` makes the *current* stream wait for
    it without blocking the host, so every read of the result queued after it (the decode)
    sees the finished bytes. Results are read only through :meth:`finish`. The send buffer is
    held here until then, so it is neither freed nor reused while the collective may read it.
    """

    def __init__(self, comm: Comm, work: Any, sent: torch.Tensor | None = None) -> None:
        self._comm, self._work, self._sent = comm, work, sent

    def finish(self) -> None:
        if self._work is not None:
            start = time.perf_counter()
            self._work.wait()
            self._work, self._sent = None, None
            self._comm._stats.seconds += time.perf_counter() - start


class PendingGather(_InFlight):
    """An all-gather in flight (:meth:`Comm.all_gather_async`)."""

    def __init__(
        self, comm: Comm, work: Any, gathered: torch.Tensor, specs: list[TensorSpec],
        sent: torch.Tensor | None = None,
    ) -> None:
        super().__init__(comm, work, sent)
        self._gathered, self._specs = gathered, specs

    def wait(self) -> list[list[torch.Tensor]]:
        """Every node's tensors, one list per node in replicate-rank order."""
        self.finish()
        return [unpack(part, self._specs) for part in self._gathered.chunk(self._comm.size)]


class PendingMean(_InFlight):
    """An all-reduce mean in flight (:meth:`Comm.all_reduce_mean_async`)."""

    def __init__(
        self, comm: Comm, work: Any, flat: torch.Tensor, tensors: list[torch.Tensor]
    ) -> None:
        super().__init__(comm, work)
        self._flat, self._shapes = flat, [t.shape for t in tensors]

    def wait(self) -> list[torch.Tensor]:
        """The means, new tensors shaped like the ones sent."""
        self.finish()
        if not self._shapes:
            return []
        if self._comm.size > 1:
            self._flat.div_(self._comm.size)
        sizes = [math.prod(shape) for shape in self._shapes]
        parts = self._flat.split(sizes)
        return [c.view(shape) for c, shape in zip(parts, self._shapes, strict=True)]


class Comm:
    """Collectives over the replicate group, coalesced into one buffer per call, and counted.

    ``Comm(group, size)`` talks over a ``torch.distributed`` group; ``group=None`` with
    ``size=1`` is a single-node run, where every call is a local no-op. ``transport=`` plugs
    in another way of moving bytes (see :class:`deto.testing.FakeComm`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        size: int | None = None,
        *,
        transport: Transport | None = None,
    ) -> None:
        if transport is not None and (group is not None or size is not None):
            raise ValueError("Pass either a process group (and size) or a transport, not both")
        self.transport = transport if transport is not None else DistTransport(group, size)
        if self.size < 1:
            raise ValueError(f"Invalid group size: {self.size}")
        self._stats = CommStats()

    @property
    def size(self) -> int:
        """Number of nodes."""
        return self.transport.size

    @property
    def rank(self) -> int:
        """This node's position among them."""
        return self.transport.rank

    def take_stats(self) -> CommStats:
        """Return what was counted since the last call, and start counting afresh."""
        stats, self._stats = self._stats, CommStats()
        return stats

    def _count(self, sent: int, start: float) -> None:
        self._stats.bytes_sent += sent
        self._stats.bytes_received += sent
        self._stats.collectives += 1
        self._stats.seconds += time.perf_counter() - start

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average ``tensors`` over the nodes with one all-reduce; returns new tensors.

        Sum then divide (``ReduceOp.AVG`` is NCCL-only). Ring all-reduce hands every rank the
        same reduced bytes, so the results are bitwise identical across nodes.
        """
        return self.all_reduce_mean_async(tensors).wait()

    def all_reduce_mean_async(self, tensors: list[torch.Tensor]) -> PendingMean:
        """Start :meth:`all_reduce_mean` and return at once; :meth:`PendingMean.wait` finishes
        it. The tensors are copied first, so they may change while the sum is in flight."""
        if not tensors:
            return PendingMean(self, None, torch.empty(0), [])
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise TypeError("all_reduce_mean needs tensors of one dtype")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if self.size == 1 or flat.numel() == 0:
            return PendingMean(self, None, flat, tensors)
        start = time.perf_counter()
        work = self.transport.all_reduce_sum(flat, async_op=True)
        self._count(all_reduce_bytes(flat.numel() * flat.element_size(), self.size), start)
        return PendingMean(self, work, flat, tensors)

    def all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Gather every node's ``tensors`` (same shapes and dtypes on every node), in one call.

        Returns one list per node, in replicate-rank order.
        """
        return self.all_gather_async(tensors).wait()

    def all_gather_async(self, tensors: list[torch.Tensor]) -> PendingGather:
        """Start :meth:`all_gather` and return at once; :meth:`PendingGather.wait` finishes it.

        Counted like :meth:`all_gather`, in the stats of the step that starts it (the seconds
        of the start and of the wait both count). Collectives complete in the order they were
        started, the same on every node.
        """
        buffer, specs = pack(tensors)
        if self.size == 1 or buffer.numel() == 0:
            return PendingGather(self, None, buffer.repeat(self.size), specs)
        start = time.perf_counter()
        gathered = buffer.new_empty(self.size * buffer.numel())
        work = self.transport.all_gather(gathered, buffer, async_op=True)
        self._count(all_gather_bytes(buffer.numel(), self.size), start)
        return PendingGather(self, work, gathered, specs, sent=buffer)

    def broadcast(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Copy node ``src``'s ``tensors`` into every node's, in place, with one call."""
        if self.size == 1 or not tensors:
            return
        start = time.perf_counter()
        buffer, specs = pack(tensors)
        self.transport.broadcast(buffer, src)
        for t, new in zip(tensors, unpack(buffer, specs), strict=True):
            t.copy_(new)
        self._count(broadcast_bytes(buffer.numel(), self.size), start)
