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
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from types import FrameType, TracebackType
from typing import Any

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

MIN_BANDWIDTH_BPS = 1000
"""Below 1 kbit/s a value is almost certainly a forgotten unit ("100" meant as 100mbit)."""
MIN_BURST_BYTES = 32 * 1024
BURST_SECONDS = 0.010
"""Default tbf burst covers 10 ms at the rate: enough for timer granularity up to HZ=100."""

VERIFY_MAX_BPS = 300_000_000
"""Above this rate a lower bound is not checked: the Python probe may be the bottleneck."""
VERIFY_UPPER = 1.15
VERIFY_LOWER = 0.5

_RUN_ID_RE = re.compile(r"^[0-9]+-[0-9a-f]{1,16}$")

_UNITS: dict[str, int] = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "kibit": 1024,
    "mibit": 1024**2,
    "gibit": 1024**3,
    "tibit": 1024**4,
}
_BANDWIDTH_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)(?:/s)?\s*$")


# --------------------------------------------------------------------------------------------
# Bandwidth parsing and formatting


def parse_bandwidth(text: str) -> int:
    """Parse a link rate into bits per second.

    Accepted: tc-style bit units ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (powers of 1000)
    and ``kibit``..``tibit`` (powers of 1024), case-insensitive, optionally with ``/s``, e.g.
    ``"100mbit"``, ``"1.5Gbit"``, ``"500kbit/s"``; a bare integer is bit/s. Byte units such as
    ``"10mbps"`` are rejected on purpose: tc reads ``mbps`` as megaBYTES per second while people
    usually mean megabits, and a silent factor of 8 would make every benchmark wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"Invalid bandwidth: {text!r} (expected a string such as '100mbit')")
    m = _BANDWIDTH_RE.match(text.lower())
    if m is None:
        raise ValueError(
            f"Invalid bandwidth: {text!r} (expected e.g. '100mbit', '1gbit', '500kbit')"
        )
    number, unit = m.group(1), m.group(2)
    if unit.endswith("bps") or unit in ("b", "kb", "mb", "gb", "tb", "bytes"):
        raise ValueError(
            f"Ambiguous bandwidth: {text!r}; byte units are not accepted (tc reads 'mbps' as "
            "megabytes/s). Write the rate in bits, e.g. '100mbit'"
        )
    if unit == "":
        if "." in number:
            raise ValueError(
                f"Invalid bandwidth: {text!r} (a bare number is bit/s and must be an integer)"
            )
        factor = 1
    elif unit in _UNITS:
        factor = _UNITS[unit]
    else:
        raise ValueError(
            f"Invalid bandwidth unit in {text!r}: {unit!r} (use one of {', '.join(_UNITS)})"
        )
    try:
        bps = int((Decimal(number) * factor).to_integral_value())
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"Invalid bandwidth: {text!r}") from exc
    if bps < MIN_BANDWIDTH_BPS:
        raise ValueError(
            f"Bandwidth too low: {text!r} = {bps} bit/s (minimum {MIN_BANDWIDTH_BPS}); "
            "did you forget a unit such as 'mbit'?"
        )
    return bps


def format_bandwidth(bps: int) -> str:
    """Format bits per second with the largest decimal tc unit, exactly (``parse`` round-trips).

    ``100_000_000 -> "100mbit"``, ``1_500_000_000 -> "1.5gbit"``, ``999 -> "999bit"``.
    """
    if isinstance(bps, bool) or not isinstance(bps, int) or bps <= 0:
        raise ValueError(f"Invalid bandwidth: {bps!r} (expected a positive integer bit/s)")
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        factor = _UNITS[unit]
        if bps >= factor:
            value = Decimal(bps) / Decimal(factor)
            text = format(value.normalize(), "f")
            return f"{text}{unit}"
    return f"{bps}bit"


# --------------------------------------------------------------------------------------------
# Link parameters


def default_burst_bytes(bandwidth_bps: int) -> int:
    """tbf bucket size for a rate: 10 ms worth of bytes, at least 32 KiB.

    The bucket must hold what accumulates between two timer ticks (``rate / HZ``, up to 10 ms
    for HZ=100) or the qdisc cannot reach its rate, and it must exceed the MTU. It should not be
    much larger, since a full bucket lets a burst leave at line rate: 10 ms at the rate distorts
    a one-second measurement by about 1%.
    """
    return max(MIN_BURST_BYTES, math.ceil(bandwidth_bps / 8 * BURST_SECONDS))


@dataclass(frozen=True)
class LinkSpec:
    """Parameters of the tbf qdisc that shapes each emulated link.

    ``latency_ms`` is tbf's queue bound (how long a packet may wait for tokens before it is
    dropped; it sizes the queue), not an added propagation delay: without netem no delay is
    emulated. ``burst_bytes=None`` picks :func:`default_burst_bytes`.
    """

    bandwidth_bps: int
    burst_bytes: int | None = None
    latency_ms: float = 50.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.bandwidth_bps, bool)
            or not isinstance(self.bandwidth_bps, int)
            or self.bandwidth_bps < MIN_BANDWIDTH_BPS
        ):
            raise ValueError(
                f"Invalid bandwidth_bps: {self.bandwidth_bps!r} (integer >= {MIN_BANDWIDTH_BPS})"
            )
        if self.burst_bytes is not None and (
            not isinstance(self.burst_bytes, int) or self.burst_bytes < 2048
        ):
            raise ValueError(f"Invalid burst_bytes: {self.burst_bytes!r} (integer >= 2048)")
        if not (isinstance(self.latency_ms, int | float) and 0 < self.latency_ms <= 10_000):
            raise ValueError(f"Invalid latency_ms: {self.latency_ms!r} (0 < latency_ms <= 10000)")

    @classmethod
    def from_text(cls, bandwidth: str) -> LinkSpec:
        """A link with default burst and queue bound for a rate such as ``"100mbit"``."""
        return cls(bandwidth_bps=parse_bandwidth(bandwidth))

    @property
    def burst(self) -> int:
        """The tbf burst actually used, in bytes."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        return default_burst_bytes(self.bandwidth_bps)


# --------------------------------------------------------------------------------------------
# Names, addresses and command construction (pure)


def new_run_id(pid: int | None = None) -> str:
    """A run id ``<pid>-<6 hex>``: the PID lets :func:`cleanup_stale` tell live runs from dead."""
    return f"{os.getpid() if pid is None else pid}-{secrets.token_hex(3)}"


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"Invalid run id: {run_id!r} (expected '<pid>-<hex>', see new_run_id)")
    return run_id


def _check_nodes(nodes: int) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 2 <= nodes <= MAX_NODES:
        raise ValueError(f"Invalid number of nodes: {nodes!r} (2 <= nodes <= {MAX_NODES})")
    return nodes


def namespace_names(run_id: str, nodes: int, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Namespace of each node: ``<prefix><run_id>-n<i>``."""
    _check_run_id(run_id)
    _check_nodes(nodes)
    return [f"{prefix}{run_id}-n{i}" for i in range(nodes)]


def bridge_namespace(run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Namespace that holds the bridge when there are more than two nodes."""
    return f"{prefix}{_check_run_id(run_id)}-br"


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


def parse_netns_list(output: str) -> list[str]:
    """Names from ``ip netns list`` output (lines like ``name (id: 3)``)."""
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def stale_namespaces(
    names: Iterable[str], is_alive: Callable[[int], bool], prefix: str = DEFAULT_PREFIX
) -> list[str]:
    """Those of ``names`` made by this module under ``prefix`` whose creating PID is gone.

    Only names matching the exact pattern this module generates are considered, so
    namespaces of other software are never touched.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}([0-9]+)-[0-9a-f]{{1,16}}-(?:n[0-9]+|br|chk)$")
    stale = []
    for name in names:
        m = pattern.match(name)
        if m is not None and not is_alive(int(m.group(1))):
            stale.append(name)
    return stale


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


def _run_checked(runner: Runner, argv: list[str]) -> subprocess.CompletedProcess[str]:
    result = runner(argv)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()
        raise NetemError(
            f"`{' '.join(argv)}` failed with exit status {result.returncode}: {detail}"
        )
    return result


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (in our PID namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespaces(runner: Runner, namespaces: Iterable[str]) -> list[str]:
    """Delete namespaces, logging (not raising) failures: used on exit paths."""
    failed = []
    for argv in teardown_commands(namespaces):
        try:
            result = runner(argv)
        except Exception as exc:  # cleanup must go on
            log.warning("netem: %s raised %s", " ".join(argv), exc)
            failed.append(argv[-1])
            continue
        if result.returncode != 0 and "No such file" not in (result.stderr or ""):
            log.warning(
                "netem: could not delete namespace %s: %s", argv[-1], (result.stderr or "").strip()
            )
            failed.append(argv[-1])
    return failed


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
            _delete_namespaces(run, [ns])


# --------------------------------------------------------------------------------------------
# Cleanup on exit and on SIGTERM

_LIVE: dict[str, EmulatedCluster] = {}
_atexit_registered = False
_previous_sigterm: Any = None
_sigterm_installed = False


def _close_all() -> None:
    for cluster in list(_LIVE.values()):
        cluster.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Remove the namespaces, then behave as the previous handler would have."""
    global _sigterm_installed
    log.warning("netem: SIGTERM, removing emulated network namespaces")
    _close_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False
    os.kill(os.getpid(), signal.SIGTERM)


def _register(cluster: EmulatedCluster) -> None:
    global _atexit_registered, _previous_sigterm, _sigterm_installed
    _LIVE[cluster.run_id] = cluster
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True
    if not _sigterm_installed:
        try:
            current = signal.getsignal(signal.SIGTERM)
            # SIG_IGN means the process chose to survive SIGTERM; None means a handler set
            # outside Python that could not be restored afterwards: leave both alone.
            if current is signal.SIG_DFL or callable(current):
                signal.signal(signal.SIGTERM, _on_sigterm)
                _previous_sigterm = current
                _sigterm_installed = True
        except ValueError:  # not the main thread: atexit and __exit__ still clean up
            log.debug("netem: SIGTERM handler not installed outside the main thread")


def _unregister(cluster: EmulatedCluster) -> None:
    global _sigterm_installed
    _LIVE.pop(cluster.run_id, None)
    if not _LIVE and _sigterm_installed:
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, _previous_sigterm)
            _sigterm_installed = False


def cleanup_stale(
    prefix: str = DEFAULT_PREFIX,
    runner: Runner | None = None,
    is_alive: Callable[[int], bool] = pid_alive,
) -> list[str]:
    """Delete namespaces left by earlier runs whose creating process no longer exists.

    A run killed with SIGKILL (or a crashed machine-level OOM kill) cannot clean up after
    itself; its namespaces would keep addresses and veths around forever. Returns the names
    deleted (those that failed to delete are logged and omitted).
    """
    run = runner or run_command
    listing = _run_checked(run, ["ip", "netns", "list"])
    stale = stale_namespaces(parse_netns_list(listing.stdout), is_alive, prefix)
    if stale:
        log.info("netem: removing stale namespaces %s", ", ".join(stale))
    failed = set(_delete_namespaces(run, stale))
    return [ns for ns in stale if ns not in failed]


# --------------------------------------------------------------------------------------------
# The cluster


@dataclass(frozen=True)
class ShapingCheck:
    """Result of :func:`verify_shaping`: the measured rate and whether it matches the limit.

    ``ok`` is None when there is nothing to judge strictly (no limit configured); above
    ``VERIFY_MAX_BPS`` only the upper bound is judged, because falling short there may be the
    probe's own limit rather than the link's.
    """

    measured_bps: float
    configured_bps: int | None
    ok: bool | None
    src: int
    dst: int
    seconds: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EmulatedCluster:
    """``nodes`` network namespaces joined by links shaped to ``link`` (None: unshaped).

    Use as a context manager: entering creates everything (and on failure removes what was
    already created before re-raising), leaving always deletes the namespaces. Namespaces are
    also deleted at interpreter exit and on SIGTERM, so a killed parent does not leak them;
    only SIGKILL can, which :func:`cleanup_stale` handles on the next run.
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
        self.nodes = _check_nodes(nodes)
        self.link = link
        self.run_id = _check_run_id(run_id) if run_id is not None else new_run_id()
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
        _register(self)
        self._open = True
        try:
            for argv in setup_commands(self.run_id, self.nodes, self.link, self.prefix):
                _run_checked(self.runner, argv)
                ns = created_namespace(argv)
                if ns is not None:
                    self.created.append(ns)
                if not self._open:  # closed meanwhile by the SIGTERM handler
                    raise NetemError(f"cluster {self.run_id} was closed during setup")
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
        """Delete every namespace created so far; idempotent and never raises."""
        created, self.created = self.created, []
        if created:
            _delete_namespaces(self.runner, reversed(created))
        self._open = False
        _unregister(self)

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
        there, so gloo must be pointed at the node interface explicitly.
        """
        self._node(node)
        return {"GLOO_SOCKET_IFNAME": IFACE}

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


# --------------------------------------------------------------------------------------------
# Throughput probe

_RECEIVER = r"""
import json, socket, sys, time
host, window, max_bytes, wait = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind((host, 0))
srv.listen(1)
srv.settimeout(wait)
print("READY", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(0.5)
buf = bytearray(1 << 16)
got, start, end = 0, None, None
hard = time.monotonic() + wait + window
while time.monotonic() < hard:
    try:
        n = conn.recv_into(buf)
    except socket.timeout:
        continue
    now = time.monotonic()
    if n == 0:
        break
    if start is None:
        start = now
    else:
        got += n
    end = now
    if now - start >= window or got >= max_bytes:
        break
conn.close()
srv.close()
print(json.dumps({"bytes": got, "seconds": (end - start) if start is not None else 0.0}))
"""

_SENDER = r"""
import socket, sys, time
host, port, duration, max_bytes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port), timeout=5.0)
s.settimeout(0.5)
chunk = bytes(1 << 16)
sent = 0
deadline = time.monotonic() + duration
try:
    while time.monotonic() < deadline and sent < max_bytes:
        try:
            sent += s.send(chunk)
        except socket.timeout:
            continue
except OSError:
    pass
s.close()
"""

PROBE_MAX_BYTES = 4 * 1024**3
PROBE_WAIT_S = 10.0


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):
        proc.communicate(timeout=5)


def probe_throughput(
    cluster: EmulatedCluster, src: int = 1, dst: int = 0, seconds: float = 1.0
) -> float:
    """Measure TCP throughput from node ``src`` to node ``dst`` in bit/s, standard library only.

    A receiver in ``dst``'s namespace counts bytes for ``seconds`` after the first one arrives,
    then closes, which stops the sender in ``src``; both are bounded in bytes
    (``PROBE_MAX_BYTES``) and time, and are killed if they overrun. Measuring at the receiver
    avoids counting data that merely sits in the sender's socket buffer.
    """
    if not 0.05 <= seconds <= 60:
        raise ValueError(f"Invalid probe duration: {seconds!r} s (0.05 <= seconds <= 60)")
    if src == dst:
        raise ValueError(f"Probe source and destination must differ, got node {src} twice")
    dst_addr = cluster.address(dst)
    cluster.address(src)
    py = [sys.executable, "-I", "-c"]
    recv_argv = (
        cluster.exec_prefix(dst)
        + py
        + [_RECEIVER, dst_addr, repr(seconds), str(PROBE_MAX_BYTES), repr(PROBE_WAIT_S)]
    )
    limit = seconds + PROBE_WAIT_S + 5.0
    recv = subprocess.Popen(recv_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    send: subprocess.Popen[str] | None = None
    try:
        assert recv.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(recv.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=PROBE_WAIT_S):
                raise NetemError("throughput probe: receiver did not start")
        ready = recv.stdout.readline().split()
        if len(ready) != 2 or ready[0] != "READY":
            recv.kill()
            _, err = recv.communicate(timeout=5)
            raise NetemError(f"throughput probe: receiver failed to start: {err.strip()}")
        send_argv = (
            cluster.exec_prefix(src)
            + py
            + [_SENDER, dst_addr, ready[1], repr(seconds + 5.0), str(PROBE_MAX_BYTES)]
        )
        send = subprocess.Popen(
            send_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        out, err = recv.communicate(timeout=limit)
        _, send_err = send.communicate(timeout=limit)
    except subprocess.TimeoutExpired as exc:
        raise NetemError(f"throughput probe did not finish within {limit:.0f} s") from exc
    finally:
        _kill(recv)
        if send is not None:
            _kill(send)
    if recv.returncode != 0:
        raise NetemError(f"throughput probe: receiver exited {recv.returncode}: {err.strip()}")
    assert send is not None
    if send.returncode != 0:
        raise NetemError(f"throughput probe: sender exited {send.returncode}: {send_err.strip()}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["seconds"] <= 0:
        raise NetemError(f"throughput probe received too little data to measure: {result}")
    bps = float(result["bytes"]) * 8.0 / float(result["seconds"])
    log.info(
        "netem: probe node %d -> %d: %.2f Mbit/s over %.2f s",
        src, dst, bps / 1e6, result["seconds"],
    )  # fmt: skip
    return bps


def judge_rate(measured_bps: float, configured_bps: int | None) -> tuple[bool | None, str]:
    """Whether a measured rate is consistent with the configured limit, with a reason."""
    if configured_bps is None:
        return None, "no limit configured"
    upper = VERIFY_UPPER * configured_bps
    if measured_bps > upper:
        return (
            False,
            f"measured rate exceeds {VERIFY_UPPER}x the configured limit: shaping is not in effect",
        )
    if configured_bps > VERIFY_MAX_BPS:
        return True, "above the verified range; only the upper bound is checked"
    if measured_bps < VERIFY_LOWER * configured_bps:
        return False, f"measured rate is below {VERIFY_LOWER}x the configured limit"
    return True, f"within [{VERIFY_LOWER}, {VERIFY_UPPER}] x the configured limit"


def verify_shaping(
    cluster: EmulatedCluster, src: int = 1, dst: int = 0, seconds: float = 1.0
) -> ShapingCheck:
    """Probe the link and judge it, so that results never claim a limit that was not there.

    The result is also stored on ``cluster.probe`` and thereby appears in ``describe()``.
    """
    measured = probe_throughput(cluster, src=src, dst=dst, seconds=seconds)
    configured = cluster.link.bandwidth_bps if cluster.link else None
    ok, note = judge_rate(measured, configured)
    check = ShapingCheck(
        measured_bps=measured,
        configured_bps=configured,
        ok=ok,
        src=src,
        dst=dst,
        seconds=seconds,
        note=note,
    )
    if ok is False:
        log.warning("netem: shaping check failed: %s", note)
    cluster.probe = check
    return check
