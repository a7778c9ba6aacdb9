"""A node's agent: torch's own launcher (``torch.distributed.run``), ended quietly by a stop.

torchrun turns SIGTERM, SIGINT and SIGHUP into an exception that, uncaught, prints a traceback
of its own polling loop; a simulated node that is stopped (a Ctrl-C, a scheduler's SIGTERM, a
failed peer) would print that wall on the terminal. Here the agent still stops its ranks as
torchrun does, and leaves with ``128 + signal``, the status a signal's death reports. Every
other failure keeps torchrun's own report.
"""

from __future__ import annotations

import sys

MODULE = "deto.launch.agent"


def argv() -> list[str]:
    """The start of an agent's command line (torchrun's arguments follow)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
