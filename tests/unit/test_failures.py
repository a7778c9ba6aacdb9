"""One line per failure: the cause a user can act on, from a rank's exception."""

from __future__ import annotations

import errno

import pytest

from deto.train.failures import (
    DISK_FULL,
    NONFINITE,
    OTHER,
    PEER_GONE,
    TIMEOUT,
    cause_of,
    failure_line,
)

GLOO_TIMEOUT = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129]"
    " Timed out waiting 3000ms for send operation to complete"
)
GLOO_CLOSED = (
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
    "[127.0.0.1]:28566"
)


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (GLOO_TIMEOUT, TIMEOUT),
        (GLOO_CLOSED, PEER_GONE),
        ("RuntimeError: Read error [127.0.0.1]:1: Connection reset by peer", PEER_GONE),
        (FloatingPointError("Non-finite gradient at step 3"), NONFINITE),
        (OSError(errno.ENOSPC, "No space left on device"), DISK_FULL),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                "writing file data/0: file write failed: No space left on device"
            ),
            DISK_FULL,
        ),
        (KeyError("step"), OTHER),
    ],
)
def test_cause_of(exc: BaseException | str, cause: object) -> None:
    assert cause_of(exc) is cause


def test_failure_line_names_node_rank_cause_and_advice() -> None:
    line = failure_line(1, 3, GLOO_TIMEOUT, 3.0)
    assert line == (
        "node 1, rank 3: a peer stopped answering within the 3 s collective timeout (a hung "
        "host, a stopped process or a dead link) (RuntimeError: Timed out waiting 3000ms for "
        "send operation to complete); check that host; raise --timeout if the link is only slow"
    )


def test_failure_line_of_an_unknown_error_keeps_its_first_line() -> None:
    line = failure_line(0, 0, ValueError("bad thing\nmore detail"), 60)
    assert line == "node 0, rank 0: ValueError: bad thing; run with -v for the traceback"
