"""Real network namespaces and tc shaping: the emulated link must be as slow as configured.

Needs root and iproute2; skipped otherwise. Every namespace created here lives only for the
test and carries addresses from the private emulation subnet, reachable from nowhere else.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys

import pytest

from deto.netem import (
    EmulatedCluster,
    LinkSpec,
    check_requirements,
    cleanup_stale,
    parse_netns_list,
    probe_throughput,
    verify_shaping,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(
        not hasattr(os, "geteuid")
        or os.geteuid() != 0
        or shutil.which("ip") is None
        or shutil.which("tc") is None,
        reason="needs root and iproute2 (ip, tc)",
    ),
]

RATE = 20_000_000


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    try:
        check_requirements(nodes=3)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return set(parse_netns_list(out.stdout))


def test_two_nodes_are_limited_and_removed() -> None:
    with EmulatedCluster(2, LinkSpec(RATE)) as cluster:
        names = set(cluster.all_namespaces())
        assert names <= _netns()
        check = verify_shaping(cluster, src=1, dst=0, seconds=1.0)
        assert 5e6 < check.measured_bps < 1.3 * RATE
        assert check.ok is True
        back = probe_throughput(cluster, src=0, dst=1, seconds=0.5)
        assert 5e6 < back < 1.3 * RATE  # both directions are shaped
        info = cluster.describe()
        assert info["probe"]["measured_bps"] == check.measured_bps
    assert not names & _netns()


def test_unshaped_link_is_faster() -> None:
    """Control for the test above: without tbf the same probe is far above 20 Mbit/s."""
    with EmulatedCluster(2, None) as cluster:
        names = set(cluster.all_namespaces())
        assert probe_throughput(cluster, seconds=0.3) > 5 * RATE
    assert not names & _netns()


def test_three_nodes_through_the_bridge() -> None:
    with EmulatedCluster(3, LinkSpec(RATE)) as cluster:
        names = set(cluster.all_namespaces())
        assert len(names) == 4
        assert 5e6 < probe_throughput(cluster, src=2, dst=0, seconds=0.5) < 1.3 * RATE
        assert 5e6 < probe_throughput(cluster, src=0, dst=1, seconds=0.5) < 1.3 * RATE
    assert not names & _netns()


def test_exception_inside_with_removes_namespaces() -> None:
    cluster = EmulatedCluster(3, LinkSpec(RATE))
    with pytest.raises(RuntimeError, match="user code"), cluster:
        assert set(cluster.all_namespaces()) <= _netns()
        raise RuntimeError("user code failed")
    assert not set(cluster.all_namespaces()) & _netns()


_HOLDER = """
import sys, time
from deto.netem import EmulatedCluster, LinkSpec
with EmulatedCluster(2, LinkSpec(10**7), prefix=sys.argv[1]) as cluster:
    print(" ".join(cluster.all_namespaces()), flush=True)
    time.sleep(60)
"""


def _start_holder(prefix: str) -> tuple[subprocess.Popen[str], set[str]]:
    """A child process that creates a cluster and waits; returns it and its namespaces."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, prefix], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30):
            proc.kill()
            pytest.fail("child did not create its cluster")
    names = set(proc.stdout.readline().split())
    assert len(names) == 2
    assert names <= _netns()
    return proc, names


def test_sigterm_of_parent_removes_namespaces() -> None:
    proc, names = _start_holder("detotest-")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM  # SystemExit, the way out cleaned up
    assert not names & _netns()


def test_cleanup_stale_after_sigkill() -> None:
    proc, names = _start_holder("detotest-")
    proc.kill()
    proc.wait(timeout=20)
    assert names <= _netns()  # SIGKILL leaves them behind...
    removed = cleanup_stale(prefix="detotest-")
    assert names <= set(removed)  # ...and the next run removes them
    assert not names & _netns()
