"""The replicate axis on torchft: a node is killed, the other trains on, a spare rejoins.

Two nodes of one rank each train FlexDeMo (FSDP2 inside the node, DeMo over torchft's managed
gloo group) against an in-process Lighthouse. Node 1 is killed with SIGKILL in the middle of a
step; node 0 retries that step alone and goes on; a spare, started beforehand and waiting, then
joins as node 1, fetches node 0's state (live recovery) and both finish together.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import time
from typing import Any

import pytest
import torch.multiprocessing as mp

pytest.importorskip("torchft")

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 12
KILL_AT = 4
ALONE = 3  # steps the survivor commits alone before the spare is let in
TOGETHER = 3  # steps both nodes must have committed together before they stop
MAX_STEPS = 400  # a bound in case the spare never joins
WAIT_S = 120


def _node(
    name: str, index: int, lighthouse: str, kill_at: int, ready: Any, go: Any, alone: Any, out: Any
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RUST_LOG", "error")
    import torch
    import torch.distributed as dist
    from common import batch, make_model
    from torch import nn

    import deto
    from deto.ft import ReplicaAxis
    from deto.replicators.base import local_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, opt = deto.prepare(
        make_model(), deto.Topology(1, 1, device="cpu"), replicator="demo", blocks="2d", topk=4, chunk=4, lr=0.01
    )
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ready.set()
    go.wait()
    axis = ReplicaAxis(
        model, opt, lighthouse=lighthouse, replica_id=name, store_addr="127.0.0.1",
        store_port=store.port, timeout=datetime.timedelta(seconds=10),
    )

    def run(step: int) -> None:
        if 0 <= kill_at <= step and axis.participants == 2:  # die in a step shared with node 0
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad(set_to_none=True)
        x, y = batch(step, index)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    log: list[tuple[int, int, bool, float]] = []  # (step after, participants, committed, s)
    while axis.step_number < MAX_STEPS:
        start = time.monotonic()
        committed = axis.step(run)
        log.append((axis.step_number, axis.participants, committed, time.monotonic() - start))
        if sum(1 for _, p, ok, _ in log if ok and p == 1) >= ALONE:
            alone.set()
        together = [p for _, p, ok, _ in log if ok][-TOGETHER:]
        if axis.step_number >= STEPS and together == [2] * TOGETHER:
            break
    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        digest.update(local_tensor(p).detach().numpy().tobytes())
    out.put({"name": name, "log": log, "healed": axis.healed, "digest": digest.hexdigest()})
    axis.shutdown()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fault_run() -> dict[str, Any]:
    from deto.ft import start_lighthouse

    lighthouse = start_lighthouse(join_timeout_ms=500, heartbeat_timeout_ms=2000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go, join, alone = ctx.Event(), ctx.Event(), ctx.Event()
    specs = [("node0", 0, -1, go), ("node1", 1, KILL_AT, go), ("node1", 1, -1, join)]
    procs, readies = [], []
    for name, index, kill_at, start in specs:
        ready = ctx.Event()
        procs.append(ctx.Process(
            target=_node, args=(name, index, lighthouse.address(), kill_at, ready, start, alone, out),
            daemon=True,
        ))
        readies.append(ready)
    try:
        for p in procs:
            p.start()
        for r in readies:
            assert r.wait(WAIT_S), "a node did not start"
        go.set()
        procs[1].join(WAIT_S)
        assert alone.wait(WAIT_S), "the survivor did not go on alone"
        join.set()  # the spare replaces the killed node
        results = {i: out.get(timeout=WAIT_S) for i in (0, 2)}
        by_name = {r["name"]: r for r in results.values()}
        return {"survivor": by_name["node0"], "spare": by_name["node1"], "killed": procs[1].exitcode}
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()


def test_killed_node_dies_by_sigkill(fault_run: dict[str, Any]) -> None:
    assert fault_run["killed"] == -signal.SIGKILL


def test_survivor_never_rolls_back(fault_run: dict[str, Any]) -> None:
    committed = [step for step, _, ok, _ in fault_run["survivor"]["log"] if ok]
    assert committed == list(range(committed[0], committed[0] + len(committed)))


def test_survivor_trains_alone_then_with_the_spare(fault_run: dict[str, Any]) -> None:
    log = fault_run["survivor"]["log"]
    failed = [step for step, _, ok, _ in log if not ok]
    assert failed and failed[0] >= KILL_AT  # the step the peer died in was tried again...
    # (before the peer first joins, a slow start can also give a step alone: not counted)
    alone = [step for step, p, ok, _ in log if ok and p == 1 and step > failed[0]]
    assert alone and min(alone) == failed[0] + 1  # ...by the survivor alone
    assert [p for _, p, ok, _ in log if ok][-TOGETHER:] == [2] * TOGETHER


def test_spare_joins_at_the_current_step_from_a_live_peer(fault_run: dict[str, Any]) -> None:
    spare = fault_run["spare"]
    assert spare["healed"] >= 1
    first = next(step for step, _, ok, _ in spare["log"] if ok)
    assert first > KILL_AT + ALONE  # not from step 0: it took the survivor's step and state


def test_replicas_identical_after_rejoin(fault_run: dict[str, Any]) -> None:
    assert fault_run["survivor"]["digest"] == fault_run["spare"]["digest"]
