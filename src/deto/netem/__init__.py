"""Emulating slow inter-node links on one Linux machine: network namespaces plus ``tc`` shaping.

Each simulated node is a network namespace with its own address; the ranks of a node are
started inside it (see :meth:`EmulatedCluster.exec_prefix`) so that everything they send to
another node crosses a veth link whose egress is rate-limited by a ``tbf`` qdisc. The ``netem``
qdisc is not assumed to exist (many kernels ship without it), so only the rate is emulated,
not propagation delay or loss.

Topology, chosen so that nothing in the root namespace is created or changed:

* 2 nodes: one veth pair between the two node namespaces.
* 3+ nodes: a bridge living in an extra namespace (``<prefix><run_id>-br``) and one veth per
  node, node end in the node namespace, the other end a port of that bridge.

Every node's own veth end is shaped (what the node sends). With a bridge the bridge port
towards each node is shaped as well, so a node's *receive* side is capped too, like a real
full-duplex NIC; with a veth pair this already follows from shaping both ends.

Addresses come from ``10.213.0.0/24`` and exist only inside these namespaces, so traffic of the
emulated cluster can never leave the machine or collide with real interfaces; two clusters
running at the same time use the same addresses in disjoint namespaces, which is fine.

Namespace names encode the creating PID (``deto-<pid>-<hex>-n<i>``) so that leftovers of a
killed run can be recognised and removed by :func:`cleanup_stale`.

The modules: :mod:`.rates` (link rates and the tbf parameters), :mod:`.commands` (names,
addresses and every ``ip``/``tc`` command, and running them), :mod:`.cluster`
(:class:`EmulatedCluster`, the requirement check), :mod:`.cleanup` (namespaces of live clusters
at exit, leftovers of killed runs) and :mod:`.probe` (measuring a link).
"""

from deto.netem.cleanup import cleanup_stale, parse_netns_list, stale_namespaces
from deto.netem.cluster import EmulatedCluster, check_requirements
from deto.netem.commands import NetemError, setup_commands, teardown_commands
from deto.netem.probe import probe_throughput, verify_shaping
from deto.netem.rates import LinkSpec, default_burst_bytes, format_bandwidth, parse_bandwidth
from deto.netem.shaping import ShapingCheck, judge_rate

__all__ = [
    "EmulatedCluster",
    "LinkSpec",
    "NetemError",
    "ShapingCheck",
    "check_requirements",
    "cleanup_stale",
    "default_burst_bytes",
    "format_bandwidth",
    "judge_rate",
    "parse_bandwidth",
    "parse_netns_list",
    "probe_throughput",
    "setup_commands",
    "stale_namespaces",
    "teardown_commands",
    "verify_shaping",
]
