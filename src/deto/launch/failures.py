"""What went wrong, in one line: a rank's exception turned into its cause and what to do.

A failing rank's exception text is rarely the story: gloo's "Timed out waiting 3000ms for send
operation" means a peer went silent, "Connection closed by peer" that a peer died, and the
cause a user can act on is neither file nor line of a traceback. :func:`failure_line` names
the node, the rank and the cause; the full traceback belongs in the run's log file.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass


class RankError(RuntimeError):
    """A rank's failure, already told as one line: node, rank, cause, what to do.

    The original exception stays attached as ``__cause__``, so the full traceback still
    reaches the log file.
    """


@dataclass(frozen=True)
class Cause:
    """A kind of failure: a short name, what it means, and what to do about it."""

    kind: str
    meaning: str
    advice: str


TIMEOUT = Cause(
    "timeout",
    "a peer stopped answering within the {timeout} collective timeout (a hung host, a stopped "
    "process or a dead link)",
    "check that host; raise --timeout if the link is only slow",
)
PEER_GONE = Cause(
    "peer-gone",
    "a peer closed its connection (it crashed or was killed)",
    "see that peer's error above or in its log; --max-restarts N restarts from a checkpoint",
)
NONFINITE = Cause(
    "nonfinite",
    "a gradient is NaN or infinite",
    "lower --lr, set --grad-clip, or try --precision fp32",
)
DISK_FULL = Cause(
    "disk-full",
    "the disk is full",
    "free space under --out or point --out elsewhere",
)
OUT_OF_MEMORY = Cause(
    "oom",
    "out of memory",
    "lower --batch-size or the model size",
)
OTHER = Cause("error", "", "run with -v for the traceback")

_PATTERNS: list[tuple[re.Pattern[str], Cause]] = [
    (re.compile(r"timed out|timeout", re.I), TIMEOUT),
    (
        re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused", re.I),
        PEER_GONE,
    ),
    (re.compile(r"non-finite|nan or inf|FloatingPointError", re.I), NONFINITE),
    (re.compile(r"no space left on device|ENOSPC", re.I), DISK_FULL),
    (re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory", re.I), OUT_OF_MEMORY),
]


def cause_of(exc: BaseException | str) -> Cause:
    """Classify an exception (or its text) by what a user can do about it."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DISK_FULL
    if isinstance(exc, FloatingPointError):
        return NONFINITE
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    for pattern, cause in _PATTERNS:
        if pattern.search(text):
            return cause
    return OTHER


def first_line(exc: BaseException | str) -> str:
    """The exception's first non-empty line, without gloo's source-file prefix."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no message")
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)


def failure_line(node: int, rank: int, exc: BaseException | str, timeout_s: float) -> str:
    """``node N, rank R: <cause> (<first line of the error>); <what to do>``, one line."""
    cause = cause_of(exc)
    detail = first_line(exc)
    if cause is OTHER:
        return f"node {node}, rank {rank}: {detail}; {cause.advice}"
    meaning = cause.meaning.format(timeout=f"{timeout_s:g} s")
    return f"node {node}, rank {rank}: {meaning} ({detail}); {cause.advice}"
