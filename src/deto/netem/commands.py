"""The command plan of an emulated cluster, and running it.

Pure functions name the namespaces, address the nodes and build every ``ip``/``tc`` argv
(see the package docstring for the topology); a :data:`Runner` executes one argv, so tests can
record the plan instead of running it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable

from deto.netem.rates import LinkSpec

log = logging.getLogger(__name__)

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]
"""Runs one argv list and returns its result without raising on a non-zero exit status."""

DEFAULT_PREFIX = "deto-"
SUBNET_PREFIX = "10.213.0."
"""First three octets of the private /24 used inside the namespaces (node i is ``.i+1``)."""
SUBNET_BITS = 24
MAX_NODES = 250
IFACE = "deto0"
"""Name of a node's only non-loopback interface, in every node namespace."""
BRIDGE = "br0"
COMMAND_TIMEOUT_S = 30.0

_RUN_ID_RE = re.compile(r"^[0-9]+-[0-9a-f]{1,16}$")


# --------------------------------------------------------------------------------------------
# Names, addresses and command construction (pure)


def new_run_id(pid: int | None = None) -> str:
    """A run id ``<pid>-<6 hex>``: the PID lets :func:`cleanup_stale` tell live runs from dead."""
    return f"{os.getpid() if pid is None else pid}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"Invalid run id: {run_id!r} (expected '<pid>-<hex>', see new_run_id)")
    return run_id


def check_nodes(nodes: int) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 2 <= nodes <= MAX_NODES:
        raise ValueError(f"Invalid number of nodes: {nodes!r} (2 <= nodes <= {MAX_NODES})")
    return nodes


def namespace_names(run_id: str, nodes: int, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Namespace of each node: ``<prefix><run_id>-n<i>``."""
    check_run_id(run_id)
    check_nodes(nodes)
    return [f"{prefix}{run_id}-n{i}" for i in range(nodes)]


def bridge_namespace(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Namespace that holds the bridge when there are more than two nodes."""
    return f"{prefix}{check_run_id(run_id)}-br"


def node_address(node: int) -> str:
    """IPv4 address of ``node`` inside its namespace (``10.213.0.<node+1>``)."""
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < MAX_NODES:
        raise ValueError(f"Invalid node index: {node!r}")
    return f"{SUBNET_PREFIX}{node + 1}"


def shaping_commands(namespace: str, dev: str, link: LinkSpec) -> list[list[str]]:
    """tc argv that puts a tbf qdisc on the egress of ``dev`` inside ``namespace``."""
    return [
        [
            "tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{link.bandwidth_bps}bit",
            "burst", str(link.burst),
            "latency", f"{link.latency_ms:g}ms",
        ]
    ]  # fmt: skip


def setup_commands(
    run_id: str, nodes: int, link: LinkSpec | None, prefix: str = DEFAULT_PREFIX
) -> list[list[str]]:
    """Every argv, in order, that builds the emulated cluster (see the module docstring).

    Namespace creation comes first so that a caller running these one by one knows exactly
    which namespaces exist when a later command fails. All other commands use ``ip -n`` /
    ``tc -n`` and so only ever touch interfaces inside the new namespaces.
    """
    names = namespace_names(run_id, nodes, prefix)
    bridged = nodes > 2
    br = bridge_namespace(run_id, prefix)
    cmds: list[list[str]] = [["ip", "netns", "add", ns] for ns in names]
    if bridged:
        cmds.append(["ip", "netns", "add", br])
    cmds += [["ip", "-n", ns, "link", "set", "dev", "lo", "up"] for ns in names]
    if bridged:
        cmds.append(["ip", "-n", br, "link", "add", "name", BRIDGE, "type", "bridge"])
        cmds.append(["ip", "-n", br, "link", "set", "dev", BRIDGE, "up"])
        for i, ns in enumerate(names):
            port = f"p{i}"
            cmds.append(["ip", "-n", ns, "link", "add", "name", IFACE, "type", "veth",
                         "peer", "name", port, "netns", br])  # fmt: skip
            cmds.append(["ip", "-n", br, "link", "set", "dev", port, "master", BRIDGE])
            cmds.append(["ip", "-n", br, "link", "set", "dev", port, "up"])
    else:
        cmds.append(["ip", "-n", names[0], "link", "add", "name", IFACE, "type", "veth",
                     "peer", "name", IFACE, "netns", names[1]])  # fmt: skip
    for i, ns in enumerate(names):
        cmds.append(
            ["ip", "-n", ns, "addr", "add", f"{node_address(i)}/{SUBNET_BITS}", "dev", IFACE]
        )
        cmds.append(["ip", "-n", ns, "link", "set", "dev", IFACE, "up"])
    if link is not None:
        for ns in names:
            cmds += shaping_commands(ns, IFACE, link)
        if bridged:
            for i in range(nodes):
                cmds += shaping_commands(br, f"p{i}", link)
    return cmds


def teardown_commands(namespaces: Iterable[str]) -> list[list[str]]:
    """argv that deletes each namespace; this also deletes the veth ends and bridge inside."""
    return [["ip", "netns", "del", ns] for ns in namespaces]


def created_namespace(argv: list[str]) -> str | None:
    """The namespace an ``ip netns add`` argv creates, else None."""
    if len(argv) == 4 and argv[:3] == ["ip", "netns", "add"]:
        return argv[3]
    return None


# --------------------------------------------------------------------------------------------
# Running commands


class NetemError(RuntimeError):
    """A command that builds or probes the emulated network failed."""


def run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Default runner: run argv without a shell, capture output, bounded in time."""
    log.debug("netem: %s", " ".join(argv))
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


def run_checked(runner: Runner, argv: list[str]) -> subprocess.CompletedProcess[str]:
    result = runner(argv)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()
        raise NetemError(
            f"`{' '.join(argv)}` failed with exit status {result.returncode}: {detail}"
        )
    return result
