"""One line per failure: the cause a user can act on, from a rank's exception."""

from __future__ import annotations

import errno

import pytest

from deto.launch.failures import (
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


def test_a_dcp_failure_becomes_an_ordinary_error_told_by_its_cause() -> None:
    """DCP's CheckpointException is a BaseException holding one traceback per rank: it must
    reach the failure line as the full disk on rank 1, not as rank 0's consequent error."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from deto.checkpoint import CheckpointError, _ordinary_errors

    none = traceback.StackSummary()
    failures = {
        0: (RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704"), none),
        1: (OSError(errno.ENOSPC, "No space left on device"), none),
    }
    with pytest.raises(CheckpointError) as caught, _ordinary_errors("saving", "ckpt/step_4"):
        raise CheckpointException("write", failures)
    assert isinstance(caught.value, Exception)
    assert str(caught.value) == (
        "saving ckpt/step_4 failed: OSError: [Errno 28] No space left on device "
        "(on rank 1; failed on ranks 0, 1)"
    )
    assert cause_of(caught.value) is DISK_FULL
    assert isinstance(caught.value.__cause__, CheckpointException)
