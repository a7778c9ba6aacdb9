"""Simulated nodes in one process, for testing what crosses nodes without a process group.

:class:`FakeComm` gives each of R simulated nodes a :class:`~deto.comm.Comm` whose bytes move
through memory instead of a network. Everything above the transport (coalescing, packing, the
byte counts) is the real :class:`~deto.comm.Comm`'s code, so a test sees exactly the traffic a
real run would count. Each node runs on its own thread; a collective waits until every node
has reached it, so the nodes run in lockstep as they do over a network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from deto._validate import check_int
from deto.comm import Comm

T = TypeVar("T")


class OutOfStep(RuntimeError):
    """A node left a collective because another node failed, finished, or called another one."""


class _Rendezvous:
    """Where the nodes' threads meet for each collective and swap their contributions."""

    def __init__(self, nodes: int, timeout_s: float) -> None:
        self.nodes = nodes
        self.barrier = threading.Barrier(nodes, timeout=timeout_s)
        self.slots: list[Any] = [None] * nodes
        self.done = [False] * nodes

    def reset(self) -> None:
        self.barrier.reset()
        self.slots = [None] * self.nodes
        self.done = [False] * self.nodes

    def finish(self, rank: int) -> None:
        """Node ``rank`` is done: release whoever still waits for it in a collective."""
        self.done[rank] = True
        if self.barrier.n_waiting:
            self.barrier.abort()

    def _wait(self, rank: int, op: str) -> None:
        finished = [i for i, d in enumerate(self.done) if d]
        if finished:
            raise OutOfStep(f"node {rank} calls {op} after node(s) {finished} finished")
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise OutOfStep(f"node {rank} left {op}: another node failed or finished") from None

    def exchange(self, rank: int, op: str, value: torch.Tensor) -> list[torch.Tensor]:
        """Publish this node's ``value`` for collective ``op``; return every node's, in order.

        Every node must call the same collective with the same buffer layout; a mismatch (the
        bug a real network turns into a hang) raises on every node.
        """
        self.slots[rank] = (op, value.dtype, tuple(value.shape), value.clone())
        self._wait(rank, op)
        seen = list(self.slots)
        self._wait(rank, op)  # nobody overwrites a slot before every node has read them all
        if len({s[:3] for s in seen}) > 1:
            calls = ", ".join(f"node {i}: {s[0]}({s[1]}, {s[2]})" for i, s in enumerate(seen))
            raise OutOfStep(f"Collectives out of step: {calls}")
        return [s[3] for s in seen]


class _MemoryTransport:
    """One node's end of the rendezvous; sums in node order, so every node gets the same bytes."""

    def __init__(self, rendezvous: _Rendezvous, rank: int) -> None:
        self._rv = rendezvous
        self.size = rendezvous.nodes
        self.rank = rank

    def all_reduce_sum(self, flat: torch.Tensor, async_op: bool = False) -> None:
        """Always finishes at once (in-memory), so there is never a handle to wait on."""
        parts = self._rv.exchange(self.rank, "all_reduce", flat)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        flat.copy_(total)

    def all_gather(self, out: torch.Tensor, buffer: torch.Tensor, async_op: bool = False) -> None:
        """Always finishes at once (in-memory), so there is never a handle to wait on."""
        torch.cat(self._rv.exchange(self.rank, "all_gather", buffer), out=out)

    def broadcast(self, buffer: torch.Tensor, src: int) -> None:
        buffer.copy_(self._rv.exchange(self.rank, f"broadcast(src={src})", buffer)[src])


class FakeComm:
    """``nodes`` simulated nodes with one :class:`~deto.comm.Comm` each (``comms[i]``).

    Build one optimizer per node on ``comms[i]`` and drive the nodes with :meth:`run`::

        fake = FakeComm(nodes=2)
        losses = fake.run(lambda comm: train(make_optimizer(comm)))  # one result per node

    Args:
        nodes: how many nodes to simulate (R).
        timeout_s: how long a collective waits for the other nodes before failing.
    """

    def __init__(self, nodes: int, *, timeout_s: float = 60.0) -> None:
        check_int("nodes", nodes, 1)
        self._rv = _Rendezvous(nodes, timeout_s)
        self.comms = [Comm(transport=_MemoryTransport(self._rv, r)) for r in range(nodes)]

    @property
    def nodes(self) -> int:
        return len(self.comms)

    def run(self, fn: Callable[[Comm], T]) -> list[T]:
        """Call ``fn(comms[i])`` for every node at once, each on its own thread.

        Returns the results in node order. If a node raises, the others are released from the
        collective they wait in and the first node's error is re-raised here.
        """
        results: list[Any] = [None] * self.nodes
        errors: list[BaseException | None] = [None] * self.nodes

        def node(rank: int) -> None:
            try:
                results[rank] = fn(self.comms[rank])
            except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                errors[rank] = exc
                self._rv.barrier.abort()
            else:
                self._rv.finish(rank)

        threads = [threading.Thread(target=node, args=(r,), daemon=True) for r in range(self.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._rv.reset()
        # the cause, rather than the nodes it released
        first = next((e for e in errors if e and not isinstance(e, OutOfStep)), None)
        first = first or next((e for e in errors if e), None)
        if first is not None:
            raise first
        return results
