"""A pool of real gloo ranks, spawned once per test session, that runs many cases.

Cases are module-level functions ``fn(*args)`` run on every rank; their return values come
back as a list in rank order. A worker's exception is re-raised in the parent with the
worker's traceback; a case that does not finish within the timeout, or whose worker dies,
fails instead of hanging. Each case starts from the environment variables the worker started
with, so what one case sets (torchrun's variables for an integration) cannot reach the next.
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
CASE_TIMEOUT_S = 120
POLL_S = 2.0  # how often a waiting case checks that every worker is alive


def _worker(rank: int, world: int, init_file: str, path: list[str], tasks: Any, results: Any) -> None:
    sys.path[:] = path
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    environ = dict(os.environ)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
            results.put((rank, False, traceback.format_exc()))
        os.environ.clear()
        os.environ.update(environ)
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int = 4) -> None:
        self.world = world
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "rendezvous")
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, init_file, list(sys.path), self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = CASE_TIMEOUT_S) -> list[Any]:
        if self.broken:  # an earlier case failed: start afresh so this one runs clean
            self.close()
            self.__init__(self.world)  # type: ignore[misc]
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors = []
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world:
            try:
                rank, ok, value = self._results.get(timeout=POLL_S)
            except queue.Empty:
                dead = [f"rank {r} (exit code {p.exitcode})"
                        for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    why = f"{', '.join(dead)} died" if dead else f"not done within {timeout}s"
                    raise TimeoutError(f"{fn.__name__}: {why}") from None
                continue
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            self.broken = True  # a failed collective can leave the others out of step
            raise AssertionError("\n".join(errors))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        if not self.broken:
            for q in self._tasks:
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()
