"""Pure tests of the network emulation: bandwidth parsing, command construction, cleanup logic.

Nothing here runs ``ip`` or ``tc``; a fake runner records what would have been run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from deto import netem
from deto.netem import (
    EmulatedCluster,
    LinkSpec,
    NetemError,
    cleanup,
    cleanup_stale,
    default_burst_bytes,
    format_bandwidth,
    judge_rate,
    parse_bandwidth,
    parse_netns_list,
    probe,
    setup_commands,
    stale_namespaces,
    teardown_commands,
)

SUBNET = ipaddress.ip_network("10.213.0.0/24")

# --------------------------------------------------------------------------------------------
# Bandwidth


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("500kbit", 500_000),
        ("1.5Gbit", 1_500_000_000),
        ("20 Mbit", 20_000_000),
        ("100mbit/s", 100_000_000),
        ("2500000", 2_500_000),
        ("1kibit", 1024),
        ("1mibit", 1024**2),
        ("  10mbit  ", 10_000_000),
        ("10gbit", 10**10),
    ],
)
def test_parse_bandwidth(text: str, bps: int) -> None:
    assert parse_bandwidth(text) == bps


@pytest.mark.parametrize(
    "text", ["", "fast", "100 megabit", "-5mbit", "1.5", "mbit", "100xbit", "1e6", "100"]
)
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="andwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize("text", ["10mbps", "10MBps", "1gbps", "100kb", "5mb"])
def test_parse_bandwidth_rejects_byte_units(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bandwidth(text)
    assert text in str(info.value)
    assert "bit" in str(info.value)


@pytest.mark.parametrize("text", ["1tbit", "10.5gbit", "20000000000"])
def test_parse_bandwidth_refuses_rates_the_probe_cannot_verify(text: str) -> None:
    with pytest.raises(ValueError, match=f"Bandwidth too high: '{text}' \\(at most 10gbit"):
        parse_bandwidth(text)


def test_parse_bandwidth_error_names_the_value() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        parse_bandwidth("fast")


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (100_000_000, "100mbit"),
        (1_500_000_000, "1.5gbit"),
        (999, "999bit"),
        (1000, "1kbit"),
        (1_234_567, "1.234567mbit"),
        (10**12, "1tbit"),
    ],
)
def test_format_bandwidth(bps: int, text: str) -> None:
    assert format_bandwidth(bps) == text


@pytest.mark.parametrize("bps", [1000, 1001, 20_000_000, 123_456_789, 10**9, 7 * 10**9 + 1])
def test_format_parse_round_trip(bps: int) -> None:
    assert parse_bandwidth(format_bandwidth(bps)) == bps


@pytest.mark.parametrize("bps", [0, -1, 1.5, True, "100mbit"])
def test_format_bandwidth_rejects(bps: object) -> None:
    with pytest.raises(ValueError, match="Invalid bandwidth"):
        format_bandwidth(bps)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# LinkSpec


def test_default_burst_is_sane() -> None:
    assert default_burst_bytes(1_000_000) == 32 * 1024  # floor: above MTU and GSO-friendly
    assert default_burst_bytes(1_000_000_000) == 1_250_000  # 10 ms at 1 Gbit/s
    for bps in (10**6, 20 * 10**6, 10**8, 10**9, 10**10):
        burst = default_burst_bytes(bps)
        assert burst >= 1514
        assert burst >= bps / 8 / 100  # covers a 10 ms (HZ=100) tick


def test_linkspec_burst_and_validation() -> None:
    assert LinkSpec(20_000_000).burst == default_burst_bytes(20_000_000)
    assert LinkSpec(20_000_000, burst_bytes=65536).burst == 65536
    assert LinkSpec.from_text("20mbit") == LinkSpec(20_000_000)
    with pytest.raises(ValueError, match="bandwidth_bps: 0"):
        LinkSpec(0)
    with pytest.raises(ValueError, match="burst_bytes: 10"):
        LinkSpec(10**6, burst_bytes=10)
    with pytest.raises(ValueError, match="latency_ms: -1"):
        LinkSpec(10**6, latency_ms=-1)


# --------------------------------------------------------------------------------------------
# Command construction

RUN_ID = "4242-abc123"


def _namespaces_added(cmds: list[list[str]]) -> list[str]:
    return [c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]]


def _tbf(cmds: list[list[str]]) -> list[tuple[str, str]]:
    """(namespace, device) of every tbf qdisc."""
    return [(c[2], c[c.index("dev") + 1]) for c in cmds if c[0] == "tc" and "tbf" in c]


def test_commands_are_argv_lists() -> None:
    for cmds in (setup_commands(RUN_ID, 2, LinkSpec(10**7)), setup_commands(RUN_ID, 4, None)):
        for argv in cmds:
            assert isinstance(argv, list)
            assert all(isinstance(a, str) and a for a in argv)
            assert argv[0] in ("ip", "tc")


def test_two_nodes_use_a_veth_pair() -> None:
    link = LinkSpec(20_000_000)
    cmds = setup_commands(RUN_ID, 2, link)
    ns = ["deto-4242-abc123-n0", "deto-4242-abc123-n1"]
    assert _namespaces_added(cmds) == ns
    veth = [c for c in cmds if "veth" in c]
    assert veth == [
        ["ip", "-n", ns[0], "link", "add", "name", "deto0", "type", "veth",
         "peer", "name", "deto0", "netns", ns[1]]
    ]  # fmt: skip
    assert not any("bridge" in c for c in cmds)
    assert sorted(_tbf(cmds)) == [(ns[0], "deto0"), (ns[1], "deto0")]
    tbf = next(c for c in cmds if "tbf" in c)
    assert tbf[tbf.index("rate") + 1] == "20000000bit"
    assert tbf[tbf.index("burst") + 1] == str(link.burst)
    assert tbf[tbf.index("latency") + 1] == "50ms"


def test_three_nodes_use_a_bridge_in_its_own_namespace() -> None:
    cmds = setup_commands(RUN_ID, 3, LinkSpec(10**8))
    nodes = [f"deto-4242-abc123-n{i}" for i in range(3)]
    br = "deto-4242-abc123-br"
    assert _namespaces_added(cmds) == [*nodes, br]
    assert ["ip", "-n", br, "link", "add", "name", "br0", "type", "bridge"] in cmds
    for i, ns in enumerate(nodes):
        assert [
            "ip", "-n", ns, "link", "add", "name", "deto0", "type", "veth",
            "peer", "name", f"p{i}", "netns", br,
        ] in cmds  # fmt: skip
        assert ["ip", "-n", br, "link", "set", "dev", f"p{i}", "master", "br0"] in cmds
    shaped = set(_tbf(cmds))
    # every node's uplink, and the bridge port towards every node (its downlink)
    assert shaped == {(ns, "deto0") for ns in nodes} | {(br, f"p{i}") for i in range(3)}


@pytest.mark.parametrize("nodes", [2, 3, 8])
def test_every_command_stays_inside_the_new_namespaces(nodes: int) -> None:
    cmds = setup_commands(RUN_ID, nodes, LinkSpec(10**7))
    created = set(_namespaces_added(cmds))
    for argv in cmds:
        if argv[:3] == ["ip", "netns", "add"]:
            continue
        assert argv[1] == "-n"
        assert argv[2] in created
        if "netns" in argv:  # the peer of a veth is created directly in another new namespace
            assert argv[argv.index("netns") + 1] in created


@pytest.mark.parametrize("nodes", [2, 3, 5, 250])
def test_addresses_unique_and_in_subnet(nodes: int) -> None:
    cmds = setup_commands(RUN_ID, nodes, None)
    addrs = [c[c.index("add") + 1] for c in cmds if "addr" in c]
    assert len(addrs) == nodes
    ifaces = [ipaddress.ip_interface(a) for a in addrs]
    assert all(i.network == SUBNET for i in ifaces)
    assert len({i.ip for i in ifaces}) == nodes
    assert all(i.ip not in (SUBNET.network_address, SUBNET.broadcast_address) for i in ifaces)
    cluster = EmulatedCluster(nodes, run_id=RUN_ID, runner=FakeRunner())
    assert [str(i.ip) for i in ifaces] == [cluster.address(n) for n in range(nodes)]


def test_unshaped_has_no_tc() -> None:
    assert not any(c[0] == "tc" for c in setup_commands(RUN_ID, 3, None))


@pytest.mark.parametrize("nodes", [2, 3, 6])
def test_teardown_deletes_every_namespace_created(nodes: int) -> None:
    created = _namespaces_added(setup_commands(RUN_ID, nodes, LinkSpec(10**7)))
    assert teardown_commands(created) == [["ip", "netns", "del", ns] for ns in created]
    assert EmulatedCluster(nodes, run_id=RUN_ID).all_namespaces() == created


@pytest.mark.parametrize("nodes", [0, 1, 251, True, 2.0])
def test_invalid_node_counts(nodes: object) -> None:
    with pytest.raises(ValueError, match="nodes"):
        setup_commands(RUN_ID, nodes, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nodes"):
        EmulatedCluster(nodes)  # type: ignore[arg-type]


@pytest.mark.parametrize("run_id", ["", "abc", "12-XYZ", "12-ab-n0", "12 -ab", "-ab"])
def test_invalid_run_id(run_id: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        EmulatedCluster(2, run_id=run_id)


def test_default_run_id_encodes_pid() -> None:
    cluster = EmulatedCluster(2)
    assert cluster.run_id.startswith(f"{os.getpid()}-")
    assert cluster.namespace(1) == f"deto-{cluster.run_id}-n1"


# --------------------------------------------------------------------------------------------
# The cluster with a fake runner


class FakeRunner:
    """Records argv; fails (exit 1, or raises) on the first argv matching ``fail``."""

    def __init__(
        self,
        fail: Callable[[list[str]], bool] | None = None,
        raise_exc: BaseException | None = None,
        netns_list: str = "",
    ) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.raise_exc = raise_exc
        self.netns_list = netns_list

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if self.fail is not None and self.fail(argv):
            if self.raise_exc is not None:
                raise self.raise_exc
            return subprocess.CompletedProcess(argv, 1, "", "RTNETLINK answers: boom")
        out = self.netns_list if argv == ["ip", "netns", "list"] else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    @property
    def deleted(self) -> list[str]:
        return [c[3] for c in self.calls if c[:3] == ["ip", "netns", "del"]]

    @property
    def added(self) -> list[str]:
        return [c[3] for c in self.calls if c[:3] == ["ip", "netns", "add"]]


@pytest.mark.parametrize("nodes", [2, 3])
def test_cluster_runs_setup_then_teardown(nodes: int) -> None:
    runner = FakeRunner()
    link = LinkSpec(10**7)
    with EmulatedCluster(nodes, link, run_id=RUN_ID, runner=runner) as cluster:
        assert runner.calls == setup_commands(RUN_ID, nodes, link)
        assert runner.deleted == []
        assert cleanup._LIVE[RUN_ID] is cluster
    assert sorted(runner.deleted) == sorted(runner.added)
    assert len(runner.deleted) == nodes + (1 if nodes > 2 else 0)
    assert RUN_ID not in cleanup._LIVE


def test_exception_in_body_still_tears_down() -> None:
    runner = FakeRunner()
    with pytest.raises(KeyError), EmulatedCluster(3, run_id=RUN_ID, runner=runner):
        raise KeyError("user code failed")
    assert sorted(runner.deleted) == sorted(runner.added)
    assert RUN_ID not in cleanup._LIVE


def test_sigterm_while_open_exits_through_the_teardown() -> None:
    runner = FakeRunner()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, EmulatedCluster(3, run_id=RUN_ID, runner=runner):
        signal.raise_signal(signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert sorted(runner.deleted) == sorted(runner.added) and runner.added
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives as long as the cluster


def test_close_is_idempotent() -> None:
    runner = FakeRunner()
    cluster = EmulatedCluster(2, run_id=RUN_ID, runner=runner)
    with cluster:
        pass
    n = len(runner.calls)
    cluster.close()
    cluster.close()
    assert len(runner.calls) == n


@pytest.mark.parametrize(
    ("fail_at", "expect_deleted"),
    [
        # the second namespace cannot be created: only the first exists and is removed
        (lambda a: a == ["ip", "netns", "add", f"deto-{RUN_ID}-n1"], [f"deto-{RUN_ID}-n0"]),
        # the first one already fails: nothing to remove, nobody else's namespace touched
        (lambda a: a[:3] == ["ip", "netns", "add"], []),
        # a veth fails after all namespaces exist: all of them are removed
        (
            lambda a: "veth" in a and f"deto-{RUN_ID}-n2" in a,
            [f"deto-{RUN_ID}-{s}" for s in ("br", "n2", "n1", "n0")],
        ),
        # shaping fails (e.g. tbf missing): all removed
        (lambda a: a[0] == "tc", [f"deto-{RUN_ID}-{s}" for s in ("br", "n2", "n1", "n0")]),
    ],
)
def test_failure_mid_setup_cleans_up_what_was_created(
    fail_at: Callable[[list[str]], bool], expect_deleted: list[str]
) -> None:
    runner = FakeRunner(fail=fail_at)
    cluster = EmulatedCluster(3, LinkSpec(10**7), run_id=RUN_ID, runner=runner)
    with pytest.raises(NetemError, match="boom"), cluster:
        pytest.fail("body must not run")
    assert runner.deleted == expect_deleted
    assert cluster.created == []
    assert RUN_ID not in cleanup._LIVE


def test_runner_exception_mid_setup_cleans_up_and_reraises() -> None:
    exc = subprocess.TimeoutExpired(["tc"], 30)
    runner = FakeRunner(fail=lambda a: a[0] == "tc", raise_exc=exc)
    cluster = EmulatedCluster(2, LinkSpec(10**7), run_id=RUN_ID, runner=runner)
    with pytest.raises(subprocess.TimeoutExpired), cluster:
        pass
    assert sorted(runner.deleted) == [f"deto-{RUN_ID}-n0", f"deto-{RUN_ID}-n1"]


def test_teardown_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(fail=lambda a: a[:3] == ["ip", "netns", "del"])
    with EmulatedCluster(2, run_id=RUN_ID, runner=runner):
        pass
    assert len(runner.deleted) == 2  # tried both even though the first failed
    assert "could not delete" in caplog.text


def test_cluster_accessors() -> None:
    cluster = EmulatedCluster(3, LinkSpec(20_000_000), run_id=RUN_ID, runner=FakeRunner())
    assert cluster.address(0) == "10.213.0.1"
    assert cluster.namespace(2) == f"deto-{RUN_ID}-n2"
    assert cluster.exec_prefix(1) == ["ip", "netns", "exec", f"deto-{RUN_ID}-n1"]
    assert cluster.env(0) == {"GLOO_SOCKET_IFNAME": "deto0", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    for bad in (-1, 3, True):
        with pytest.raises(ValueError, match=f"node index: {bad!r}"):
            cluster.address(bad)
    info = cluster.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["bandwidth_bps"] == 20_000_000
    assert info["bandwidth"] == "20mbit"
    assert "tbf" in info["method"]
    assert info["probe"] is None
    assert info["addresses"] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    unshaped = EmulatedCluster(2, None, run_id=RUN_ID).describe()
    assert unshaped["bandwidth_bps"] is None
    assert "tbf" not in unshaped["method"]


def test_verify_shaping_records_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = EmulatedCluster(2, LinkSpec(20_000_000), run_id=RUN_ID, runner=FakeRunner())
    monkeypatch.setattr(probe, "probe_throughput", lambda c, src, dst, seconds: 19e6)
    check = netem.verify_shaping(cluster)
    assert check.ok is True
    assert check.measured_bps == 19e6
    assert cluster.describe()["probe"]["measured_bps"] == 19e6


@pytest.mark.parametrize(
    ("measured", "configured", "ok"),
    [
        (19e6, 20_000_000, True),
        (22.9e6, 20_000_000, True),
        (23.1e6, 20_000_000, False),  # over the limit: shaping is not there
        (9.9e6, 20_000_000, False),
        (10.1e6, 20_000_000, True),
        (200e6, 10**9, True),  # fast links: a slow probe is not the link's fault
        (1.2e9, 10**9, False),  # ...but exceeding the limit still is
        (5e9, None, None),
    ],
)
def test_judge_rate(measured: float, configured: int | None, ok: bool | None) -> None:
    assert judge_rate(measured, configured)[0] is ok


def test_probe_rejects_bad_arguments() -> None:
    cluster = EmulatedCluster(2, run_id=RUN_ID, runner=FakeRunner())
    with pytest.raises(ValueError, match="node 1 twice"):
        netem.probe_throughput(cluster, src=1, dst=1)
    with pytest.raises(ValueError, match="duration: 0"):
        netem.probe_throughput(cluster, seconds=0)
    with pytest.raises(ValueError, match="node index: 5"):
        netem.probe_throughput(cluster, src=5)


# --------------------------------------------------------------------------------------------
# Stale cleanup and requirement checks


def test_parse_netns_list() -> None:
    out = "deto-1-ab-n0 (id: 3)\ndeto-1-ab-n1\n\nother\n"
    assert parse_netns_list(out) == ["deto-1-ab-n0", "deto-1-ab-n1", "other"]


def test_stale_namespaces_only_matches_own_dead_names() -> None:
    names = [
        "deto-100-ab12cd-n0",  # dead pid
        "deto-100-ab12cd-br",
        "deto-100-ab12cd-chk",
        "deto-200-ab12cd-n0",  # alive
        "deto-100-ab12cd",  # not a name this module makes
        "deto-100-ab12cd-n0x",
        "deto-foo-ab12cd-n0",
        "other-100-ab12cd-n0",
        "mydeto-100-ab12cd-n0",
    ]
    alive = {200}
    got = stale_namespaces(names, lambda pid: pid in alive)
    assert got == ["deto-100-ab12cd-n0", "deto-100-ab12cd-br", "deto-100-ab12cd-chk"]


def test_cleanup_stale_deletes_only_dead_runs() -> None:
    listing = "deto-100-aa-n0 (id: 1)\ndeto-100-aa-n1 (id: 2)\ndeto-200-bb-n0 (id: 3)\nvpn\n"
    runner = FakeRunner(netns_list=listing)
    removed = cleanup_stale(runner=runner, is_alive=lambda pid: pid == 200)
    assert removed == ["deto-100-aa-n0", "deto-100-aa-n1"]
    assert runner.deleted == removed


def test_cleanup_stale_stops_what_a_killed_run_left_running_first() -> None:
    code = "import time; print(1, flush=True); time.sleep(600)"
    orphan = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "deto", "train"], stdout=subprocess.PIPE
    )
    assert orphan.stdout is not None and orphan.stdout.readline()

    class WithPids(FakeRunner):
        def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
            if argv == ["ip", "netns", "pids", "deto-100-aa-n0"]:
                self.calls.append(list(argv))
                return subprocess.CompletedProcess(argv, 0, f"{orphan.pid}\n", "")
            return super().__call__(argv)

    runner = WithPids(netns_list="deto-100-aa-n0 (id: 1)\n")
    try:
        assert cleanup_stale(runner=runner, is_alive=lambda pid: False) == ["deto-100-aa-n0"]
        assert orphan.wait(timeout=30) == -signal.SIGTERM
        pids_at = runner.calls.index(["ip", "netns", "pids", "deto-100-aa-n0"])
        assert pids_at < runner.calls.index(["ip", "netns", "del", "deto-100-aa-n0"])
    finally:
        orphan.kill()


def test_cleanup_stale_with_other_prefix() -> None:
    runner = FakeRunner(netns_list="x-100-aa-n0\ndeto-100-aa-n0\n")
    assert cleanup_stale(prefix="x-", runner=runner, is_alive=lambda pid: False) == ["x-100-aa-n0"]


def test_pid_alive() -> None:
    assert cleanup.pid_alive(os.getpid())
    assert not cleanup.pid_alive(0)
    assert not cleanup.pid_alive(2**22 + 12345)  # above the default pid_max


def test_check_requirements_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError) as info:
        netem.check_requirements(runner=FakeRunner())
    msg = str(info.value)
    assert "not root" in msg
    assert "`ip` not found" in msg
    assert "`tc` not found" in msg


def test_check_requirements_tbf_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/sbin/{name}")
    runner = FakeRunner(fail=lambda a: "tbf" in a)
    with pytest.raises(RuntimeError, match="tbf unavailable"):
        netem.check_requirements(runner=runner)
    assert runner.deleted == runner.added  # the trial namespace is removed
    assert len(runner.added) == 1
    assert runner.added[0].endswith("-chk")


def test_check_requirements_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/sbin/{name}")
    runner = FakeRunner()
    netem.check_requirements(nodes=3, runner=runner)
    assert any("bridge" in c for c in runner.calls)
    assert runner.deleted == runner.added


def test_probe_peers_measure_a_loopback_connection() -> None:
    """The probe's two programs, run as the probe runs them, over this machine's loopback."""
    import sys

    recv = subprocess.Popen(
        [sys.executable, "-I", probe.PEER, "receive", "127.0.0.1", "0.2", "1000000", "10"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert recv.stdout is not None
    ready = recv.stdout.readline().split()
    assert ready[0] == "READY"
    send = subprocess.run(
        [sys.executable, "-I", probe.PEER, "send", "127.0.0.1", ready[1], "5", "1000000"],
        timeout=60, check=False,
    )  # fmt: skip
    out, _ = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert 0 < result["bytes"] <= 1_000_000 and result["seconds"] > 0


def test_probe_peer_usage() -> None:
    from deto.netem.probe_peer import main

    assert main(["listen"]) == 2
