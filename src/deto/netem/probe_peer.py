"""The two ends of the throughput probe, each run inside a node's namespace by :mod:`.probe`.

``receive HOST WINDOW MAX_BYTES WAIT``: listen on a free port of HOST, print ``READY <port>``,
accept one connection (waiting at most WAIT seconds), then count the bytes that arrive during
WINDOW seconds after the first one (or up to MAX_BYTES) and print
``{"bytes": ..., "seconds": ...}``. Counting at the receiver leaves out data that merely sits
in the sender's socket buffer; the first read only starts the clock.

``send HOST PORT DURATION MAX_BYTES``: connect and send zeros for DURATION seconds, up to
MAX_BYTES, or until the receiver closes.

Standard library only, and started as a script with ``python -I <this file>`` rather than with
``-m``: ``-m`` imports the ``deto`` package first, and with it torch, which can take longer on
a loaded machine than the probe waits for the receiver to get ready.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

CHUNK = 1 << 16
POLL_S = 0.5


def receive(host: str, window: float, max_bytes: int, wait: float) -> dict[str, Any]:
    """Count the bytes of one connection over ``window`` seconds (see the module docstring)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen(1)
        server.settimeout(wait)
        print("READY", server.getsockname()[1], flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(POLL_S)
            buf = bytearray(CHUNK)
            got, start, end = 0, None, None
            hard = time.monotonic() + wait + window
            while time.monotonic() < hard:
                try:
                    n = conn.recv_into(buf)
                except TimeoutError:
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
    seconds = end - start if start is not None and end is not None else 0.0
    return {"bytes": got, "seconds": seconds}


def send(host: str, port: int, duration: float, max_bytes: int) -> int:
    """Send zeros to ``host:port`` until ``duration`` or ``max_bytes``; return the bytes sent."""
    chunk = bytes(CHUNK)
    sent = 0
    deadline = time.monotonic() + duration
    with socket.create_connection((host, port), timeout=5.0) as s:
        s.settimeout(POLL_S)
        try:
            while time.monotonic() < deadline and sent < max_bytes:
                try:
                    sent += s.send(chunk)
                except TimeoutError:
                    continue
        except OSError:  # the receiver has what it needs and closed
            pass
    return sent


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "receive":
        host, window, max_bytes, wait = argv[1], float(argv[2]), int(argv[3]), float(argv[4])
        print(json.dumps(receive(host, window, max_bytes, wait)), flush=True)
        return 0
    if len(argv) == 5 and argv[0] == "send":
        send(argv[1], int(argv[2]), float(argv[3]), int(argv[4]))
        return 0
    print(f"usage: receive HOST WINDOW MAX_BYTES WAIT | send HOST PORT DURATION MAX_BYTES; "
          f"got {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
