"""An emulated cluster: node namespaces joined by shaped links, built and torn down as one."""

from __future__ import annotations

import logging
import os
import shutil
from types import TracebackType
from typing import TYPE_CHECKING, Any

from deto.netem.cleanup import delete_namespaces, register, unregister
from deto.netem.commands import (
    BRIDGE,
    DEFAULT_PREFIX,
    IFACE,
    Runner,
    bridge_namespace,
    check_nodes,
    check_run_id,
    created_namespace,
    namespace_names,
    new_run_id,
    node_address,
    run_checked,
    run_command,
    setup_commands,
)
from deto.netem.rates import MIN_BURST_BYTES, LinkSpec, format_bandwidth

if TYPE_CHECKING:
    from deto.netem.shaping import ShapingCheck

log = logging.getLogger(__name__)


def check_requirements(nodes: int = 2, runner: Runner | None = None) -> None:
    """Raise RuntimeError naming what is missing for emulation; return None if all is there.

    Checks root, ``ip`` and ``tc`` on PATH, then actually creates a throw-away namespace with
    a veth pair, a tbf qdisc (and a bridge for more than two nodes) and deletes it again: the
    only reliable way to learn whether the kernel offers these inside this container.
    """
    missing = []
    if os.geteuid() != 0:
        missing.append(f"not root (uid {os.geteuid()}); network namespaces and tc need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` not found on PATH (install iproute2)")
    if missing:
        raise RuntimeError("bandwidth emulation unavailable: " + "; ".join(missing))

    run = runner or run_command
    ns = f"{DEFAULT_PREFIX}{new_run_id()}-chk"
    steps: list[tuple[list[str], str]] = [
        (["ip", "netns", "add", ns], "cannot create network namespaces"),
        (["ip", "-n", ns, "link", "add", "name", "chk0", "type", "veth", "peer", "name", "chk1"],
         "veth interfaces unavailable"),
        (["tc", "-n", ns, "qdisc", "add", "dev", "chk0", "root", "tbf", "rate", "1mbit",
          "burst", str(MIN_BURST_BYTES), "latency", "50ms"],
         "tc qdisc tbf unavailable (kernel module sch_tbf)"),
    ]  # fmt: skip
    if nodes > 2:
        steps.append(
            (
                ["ip", "-n", ns, "link", "add", "name", BRIDGE, "type", "bridge"],
                "bridge interfaces unavailable",
            )
        )
    created = False
    try:
        for argv, what in steps:
            result = run(argv)
            if result.returncode != 0:
                detail = (result.stderr or "").strip()
                raise RuntimeError(f"bandwidth emulation unavailable: {what}: {detail}")
            created = True
    finally:
        if created:
            delete_namespaces(run, [ns])



class EmulatedCluster:
    """``nodes`` network namespaces joined by links shaped to ``link`` (None: unshaped).

    Use as a context manager: entering creates everything (and on failure removes what was
    already created before re-raising), leaving always deletes the namespaces. Namespaces are
    also deleted at interpreter exit, and while the cluster is open SIGTERM raises
    ``SystemExit``, so a terminated parent does not leak them; only SIGKILL can, which
    :func:`cleanup_stale` handles on the next run.
    """

    def __init__(
        self,
        nodes: int,
        link: LinkSpec | None = None,
        run_id: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        runner: Runner | None = None,
    ) -> None:
        self.nodes = check_nodes(nodes)
        self.link = link
        self.run_id = check_run_id(run_id) if run_id is not None else new_run_id()
        self.prefix = prefix
        self.runner: Runner = runner or run_command
        self.created: list[str] = []
        self.probe: ShapingCheck | None = None
        self._open = False

    @property
    def namespaces(self) -> list[str]:
        """Node namespaces, index = node."""
        return namespace_names(self.run_id, self.nodes, self.prefix)

    @property
    def bridged(self) -> bool:
        return self.nodes > 2

    def all_namespaces(self) -> list[str]:
        """Every namespace this cluster creates (nodes, then the bridge namespace if any)."""
        extra = [bridge_namespace(self.run_id, self.prefix)] if self.bridged else []
        return self.namespaces + extra

    def open(self) -> None:
        """Create namespaces, links and shaping; on any failure undo and re-raise."""
        if self._open:
            raise RuntimeError(f"cluster {self.run_id} is already open")
        register(self)
        self._open = True
        try:
            for argv in setup_commands(self.run_id, self.nodes, self.link, self.prefix):
                run_checked(self.runner, argv)
                ns = created_namespace(argv)
                if ns is not None:
                    self.created.append(ns)
        except BaseException:
            log.error("netem: setting up cluster %s failed, removing what was created", self.run_id)
            self.close()
            raise
        log.info(
            "netem: %d nodes in namespaces %s..., link %s",
            self.nodes,
            self.namespaces[0],
            format_bandwidth(self.link.bandwidth_bps) if self.link else "unshaped",
        )

    def close(self) -> None:
        """Delete every namespace created so far, newest first; idempotent, and raises only
        when interrupted (what is left is then deleted at interpreter exit)."""
        while self.created:
            delete_namespaces(self.runner, [self.created[-1]])
            self.created.pop()
        self._open = False
        unregister(self)

    def __enter__(self) -> EmulatedCluster:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _node(self, node: int) -> int:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < self.nodes:
            raise ValueError(f"Invalid node index: {node!r} (cluster has {self.nodes} nodes)")
        return node

    def address(self, node: int) -> str:
        """IPv4 address of ``node``; ``address(0)`` is the rendezvous address."""
        return node_address(self._node(node))

    def namespace(self, node: int) -> str:
        return self.namespaces[self._node(node)]

    def exec_prefix(self, node: int) -> list[str]:
        """argv prefix that runs a command inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def env(self, node: int) -> dict[str, str]:
        """Environment for ranks of ``node``: tell gloo which interface carries the traffic.

        Inside a namespace the machine's hostname resolves to an address that does not exist
        there, so gloo must be pointed at the node interface explicitly; and c10d, which warns
        on every connection whose peer's name does not resolve, logs errors only.
        """
        self._node(node)
        return {"GLOO_SOCKET_IFNAME": IFACE, "TORCH_CPP_LOG_LEVEL": "ERROR"}

    @property
    def method(self) -> str:
        if self.link is None:
            return "unshaped veth links in network namespaces"
        where = "node veth and bridge port egress" if self.bridged else "veth egress"
        return f"tc tbf on {where} in network namespaces"

    def describe(self) -> dict[str, Any]:
        """JSON-able account of how the network was emulated, for run metadata."""
        return {
            "nodes": self.nodes,
            "run_id": self.run_id,
            "method": self.method,
            "topology": "bridge" if self.bridged else "veth pair",
            "bandwidth_bps": self.link.bandwidth_bps if self.link else None,
            "bandwidth": format_bandwidth(self.link.bandwidth_bps) if self.link else None,
            "burst_bytes": self.link.burst if self.link else None,
            "queue_latency_ms": self.link.latency_ms if self.link else None,
            "delay_emulated": False,
            "addresses": [self.address(i) for i in range(self.nodes)],
            "namespaces": self.namespaces,
            "probe": self.probe.to_dict() if self.probe else None,
        }

