"""Measuring an emulated link: a TCP throughput probe between two node namespaces, judged
against the configured rate, so that results never claim a limit that was not there."""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import subprocess
import sys
from pathlib import Path

from deto.netem.cluster import EmulatedCluster
from deto.netem.commands import NetemError
from deto.netem.shaping import ShapingCheck, judge_rate

log = logging.getLogger(__name__)

PROBE_MAX_BYTES = 4 * 1024**3
PROBE_WAIT_S = 10.0
PEER = str(Path(__file__).with_name("probe_peer.py"))
"""The probe's two ends, run as a script (see :mod:`deto.netem.probe_peer`)."""


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
    py = [sys.executable, "-I", PEER]
    recv_argv = (
        cluster.exec_prefix(dst)
        + py
        + ["receive", dst_addr, repr(seconds), str(PROBE_MAX_BYTES), repr(PROBE_WAIT_S)]
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
            + ["send", dst_addr, ready[1], repr(seconds + 5.0), str(PROBE_MAX_BYTES)]
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
