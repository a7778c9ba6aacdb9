"""Time and memory of a scheme on a cluster: the traffic priced on a link, with a given compute
time per step, and what each rank holds.

Time. A node's ranks share the node's link, so a step's exchange takes the node's bytes over
the bandwidth, plus the link's latency once per sequential ring step of the busiest rank
(:meth:`Traffic.hops`). Without overlap a step is compute plus exchange; an exchange that may
run under ``h`` steps of compute (DeMo and Full with ``overlap``, Streaming DiLoCo's
``overlap_steps``) adds only what exceeds them: ``compute + max(0, comm - h * compute)``, which
for ``h = 1`` is ``max(compute, comm)``. Times are averaged over the schedule's period
(DiLoCo's H steps, a Striding cycle); the peak is the busiest step's. They are the steady
state: DeMo's first ``overlap_after`` exchanges, which run in the step, are not counted.

Memory (fp32, the busiest rank, rank 0, which holds the largest shards): parameters, gradients,
the base optimizer's per-parameter state, and the replicator's checkpointed state (momenta,
anchors, error buffers, pending sums). Workspaces a step allocates are not counted.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deto.plan.shapes import ModelShapes, Shape, local_shapes
from deto.plan.traffic import FP32, Traffic, traffic
from deto.replicators import Replicator
from deto.replicators.base import Slot


@dataclass(frozen=True)
class Link:
    """A node's inter-node link: ``bandwidth_bps`` bits per second each way, ``latency_s`` per
    message."""

    bandwidth_bps: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth_bps, (int, float)) and self.bandwidth_bps > 0
                and math.isfinite(self.bandwidth_bps)):  # fmt: skip
            raise ValueError(f"Invalid bandwidth: {self.bandwidth_bps!r} (must be > 0 bit/s)")
        if not (isinstance(self.latency_s, (int, float)) and 0 <= self.latency_s < math.inf):
            raise ValueError(f"Invalid latency: {self.latency_s!r} (must be >= 0 s)")

    def seconds(self, nbytes: int, hops: int) -> float:
        return 8 * nbytes / self.bandwidth_bps + hops * self.latency_s


@dataclass(frozen=True)
class Scheme:
    """A scheme as the plan needs it: its replicator (``None``: torch's HSDP) and base
    optimizer."""

    name: str
    replicator: Replicator | None
    optimizer: type[torch.optim.Optimizer]


@dataclass(frozen=True)
class Prediction:
    """One scheme on one cluster; bytes are sent (as many are received), per step averaged
    over ``period`` steps unless named peak."""

    scheme: str
    nodes: int
    ranks_per_node: int
    period: int
    bytes_per_step: float  # per rank: the node's / ranks_per_node
    node_bytes_per_step: float
    peak_node_bytes: int
    comm_s: float
    peak_comm_s: float
    compute_s: float
    step_s: float  # as the scheme runs: with its own overlap, if any
    step_s_serial: float  # compute + exchange
    step_s_overlapped: float  # each exchange hidden under one step of compute
    utilization: float  # compute / step_s
    memory_bytes: int
    memory: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _step_time(compute: float, comm: list[float], hidden: int) -> float:
    return sum(compute + max(0.0, c - hidden * compute) for c in comm) / len(comm)


def predict_traffic(
    scheme: Scheme, model: ModelShapes, flow: Traffic, nodes: int, ranks_per_node: int,
    link: Link, compute_s: float,
) -> Prediction:
    """Price ``flow`` (the scheme's :func:`traffic`) at ``nodes`` on ``link``."""
    if nodes < 1:
        raise ValueError(f"Invalid nodes: {nodes} (must be >= 1)")
    if not (compute_s >= 0 and math.isfinite(compute_s)):
        raise ValueError(f"Invalid compute time: {compute_s!r} (must be >= 0 s)")
    node_bytes = flow.node_bytes(nodes)
    comm = [link.seconds(b, h) for b, h in zip(node_bytes, flow.hops(nodes), strict=True)]
    step_s = _step_time(compute_s, comm, flow.hidden_steps)
    memory = memory_per_rank(scheme, model, ranks_per_node)
    return Prediction(
        scheme=scheme.name, nodes=nodes, ranks_per_node=ranks_per_node, period=flow.period,
        bytes_per_step=sum(node_bytes) / flow.period / ranks_per_node,
        node_bytes_per_step=sum(node_bytes) / flow.period, peak_node_bytes=max(node_bytes),
        comm_s=sum(comm) / len(comm), peak_comm_s=max(comm), compute_s=compute_s,
        step_s=step_s, step_s_serial=_step_time(compute_s, comm, 0),
        step_s_overlapped=_step_time(compute_s, comm, 1),
        utilization=compute_s / step_s if step_s else 1.0,
        memory_bytes=sum(memory.values()), memory=dict(memory),
    )


def predict(
    scheme: Scheme, model: ModelShapes, nodes: int, ranks_per_node: int, link: Link,
    compute_s: float,
) -> Prediction:
    """The bytes, times and memory of ``scheme`` training ``model`` on ``nodes`` x
    ``ranks_per_node`` ranks."""
    if ranks_per_node < 1:
        raise ValueError(f"Invalid ranks per node: {ranks_per_node} (must be >= 1)")
    flow = traffic(model, scheme.replicator, ranks_per_node)
    return predict_traffic(scheme, model, flow, nodes, ranks_per_node, link, compute_s)


def optimizer_state_copies(optimizer: type[torch.optim.Optimizer]) -> int:
    """How many parameter-sized tensors ``optimizer`` keeps per parameter, found by stepping it
    once on a two-element parameter (AdamW: 2; SGD without momentum: 0)."""
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    build: Any = optimizer  # every torch optimizer takes its parameters and an lr
    opt = build([p], lr=1e-3)
    opt.step()
    return sum(1 for t in opt.state[p].values()
               if isinstance(t, torch.Tensor) and t.numel() == p.numel())  # fmt: skip


def replicator_state_bytes(rep: Replicator | None, shapes: list[Shape]) -> int:
    """Bytes of the state ``rep`` keeps for shards of ``shapes``: it is bound to meta tensors of
    each distinct shape once (no memory is used) and its buffers are counted, each once."""
    options = getattr(rep, "options", None)
    if rep is None or options is None:  # torch's HSDP, or a stateless scheme
        return 0
    counts = Counter(shapes)
    distinct = list(counts)
    fresh = type(rep)(**options.changed())
    fresh.bind([Slot(i, f"p{i}", torch.empty(s, device="meta")) for i, s in enumerate(distinct)])
    total = 0
    for shape, state in zip(distinct, fresh.state, strict=True):
        unique = {id(t): t for t in state.values()}.values()
        total += counts[shape] * sum(t.numel() * t.element_size() for t in unique)
    return total


@functools.lru_cache(maxsize=64)
def memory_per_rank(scheme: Scheme, model: ModelShapes, ranks_per_node: int) -> dict[str, int]:
    """Bytes rank 0 holds, by kind (see the module docstring); the same at any node count and
    on any link, so it is kept per scheme, model and node."""
    shapes = local_shapes(model, ranks_per_node)[0]
    params = FP32 * sum(math.prod(s) for s in shapes)
    return {
        "params": params,
        "grads": params,
        "optimizer": optimizer_state_copies(scheme.optimizer) * params,
        "replicator": replicator_state_bytes(scheme.replicator, shapes),
    }


MAX_NODES = 1 << 20
"""The most nodes the plan prices (and the crossover searches)."""


def crossover(
    a: Traffic, b: Traffic, *, max_nodes: int = MAX_NODES
) -> int | None:
    """The fewest nodes (>= 2) at which ``a`` sends more per step than ``b`` on average, or
    ``None`` up to ``max_nodes``. Found by doubling and bisection, so it assumes that once
    ``a`` sends more it keeps sending more: true of an all-gather against an all-reduce, whose
    ratio grows with the nodes."""

    def more(nodes: int) -> bool:
        return sum(a.node_bytes(nodes)) * b.period > sum(b.node_bytes(nodes)) * a.period

    if more(2):
        return 2
    low, high = 2, 4
    while not more(high):
        if high >= max_nodes:
            return None
        low, high = high, min(2 * high, max_nodes)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if more(mid) else (mid, high)
    return high
