"""Processes that end with their parent: nothing of a run outlives the command that started it.

A ``kill -9`` of ``deto train`` gives it no chance to stop what it started; its node agents and
ranks would go on training into the run directory. Linux's ``PR_SET_PDEATHSIG`` asks the kernel
to send a signal to a process when its parent dies, whatever the manner of death: every rank
and every node agent sets it (a rank in its entry function, an agent through
:func:`popen_kwargs`), so the chain parent, agent, ranks falls as one. Elsewhere (macOS) it is
a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; return whether it
    could. If the parent (``parent``: the pid it is expected to be) is already gone, exit now."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:  # it died before the call: no signal comes
        os._exit(128 + int(sig))
    return True


def popen_kwargs() -> dict[str, Any]:
    """``subprocess.Popen`` arguments that make the child die with this process."""
    if not sys.platform.startswith("linux"):
        return {}
    parent = os.getpid()
    return {"preexec_fn": lambda: die_with_parent(parent=parent)}
