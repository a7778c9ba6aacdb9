"""The inter-node link as the training sees it: a timed exchange between the nodes at start-up.

It runs over the mesh's ``replicate`` axis, the groups every replicator uses, with all ranks of
a node exchanging at once (they share the node's link, as in training), on whatever backend
and network the run has: a simulated cluster's shaped veth pairs, or real nodes under
torchrun. Latency is the time of a one-value all-reduce over its ring steps; bandwidth is
the node's bytes of a large all-reduce over its time less that latency. The payload grows
fourfold until one exchange takes :data:`MIN_TIMED_S`, so a slow link is measured in about a
second and a fast one is not measured on a payload its start-up costs dominate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deto.comm import all_reduce_bytes
from deto.topology import Topology

MIN_TIMED_S = 0.2
"""The shortest exchange that measures bandwidth: long enough to leave a token bucket's burst
and TCP's slow start behind."""
FIRST_BYTES = 64 * 1024
MAX_BYTES = 64 * 1024 * 1024
LATENCY_REPEATS = 5


@dataclass(frozen=True)
class LinkMeasurement:
    """What :func:`measure_link` found: a node's bandwidth each way and the latency per ring
    step, with the exchange that measured the bandwidth (``node_bytes`` in ``seconds``)."""

    bandwidth_bps: float
    latency_s: float
    node_bytes: int
    seconds: float


def _timed_all_reduce(t: torch.Tensor, group: dist.ProcessGroup, device: torch.device) -> float:
    """Seconds of one all-reduce of ``t``, the slowest rank's (every rank gets the same)."""
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(t, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.item())


def from_timings(
    node_bytes: int, seconds: float, hops: int, small_seconds: float
) -> LinkMeasurement:
    """The link that moves ``node_bytes`` in ``seconds`` and a one-value exchange of ``hops``
    ring steps in ``small_seconds``."""
    latency = small_seconds / hops
    wire = max(seconds - hops * latency, 1e-9)
    return LinkMeasurement(8 * node_bytes / wire, latency, node_bytes, seconds)


def measure_link(topology: Topology) -> LinkMeasurement:
    """Time exchanges between the nodes of ``topology`` (a collective: every rank calls it, and
    every rank gets the same answer). Needs at least two nodes."""
    if topology.nodes < 2:
        raise ValueError("measure_link needs at least 2 nodes (nothing crosses nodes on 1)")
    group = topology.mesh["replicate"].get_group()
    device = topology.torch_device
    hops = 2 * (topology.nodes - 1)
    one = torch.zeros(1, device=device)
    _timed_all_reduce(one, group, device)  # connections and buffers are set up once, untimed
    small = statistics.median(_timed_all_reduce(one, group, device)
                              for _ in range(LATENCY_REPEATS))  # fmt: skip
    nbytes = FIRST_BYTES
    while True:
        seconds = _timed_all_reduce(torch.zeros(nbytes // 4, device=device), group, device)
        if seconds >= MIN_TIMED_S or nbytes >= MAX_BYTES:
            break
        nbytes *= 4
    node_bytes = topology.ranks_per_node * all_reduce_bytes(nbytes, topology.nodes)
    return from_timings(node_bytes, seconds, hops, small)
