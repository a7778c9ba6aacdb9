"""The self-check's FSDP2 steps: DeMo and Full over a real process group, sharded by FSDP2.

NCCL refuses two ranks on one GPU, so one GPU cannot host two simulated nodes of real ranks.
Where there is one device, the world is a single rank (NCCL on CUDA, gloo on the CPU: a real
process group, the backend's own collectives under FSDP2) and two simulated nodes run on it as
:class:`deto.testing.FakeComm` threads, each with its own FSDP2-sharded model on its own
one-rank group (NCCL does not promise that two threads may drive one communicator at once, so
each node's thread gets its own). Where there are
several GPUs, :func:`main` is the body of a ``torchrun`` launch with ``DETO_NODES=2``: real
NCCL inside and across the nodes.

Each run also counts the persistent state a rank holds, from its live tensors, in the kinds of
:func:`deto.plan.memory_per_rank` (:func:`held_bytes`), so the self-check can hold the plan's
memory model to what a real FSDP2 run keeps (:func:`planned_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

import deto
from deto import plan
from deto.replicators.base import local_tensor
from deto.sharding import shard_model

STEPS = 4
LR = 1e-3
SCHEMES: dict[str, Callable[[], deto.Replicator]] = {
    "demo": lambda: deto.DeMo(topk=4, chunk=16),
    "full": lambda: deto.Full(),
}


class Block(nn.Module):
    """A residual MLP block: the repeated unit FSDP2 shards on its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.fc(x))


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), Block(64), Block(64), nn.Linear(64, 32))


def batch(step: int, node: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + node)
    return torch.randn(16, 32, generator=g).to(device)


def train_steps(
    model: nn.Module, opt: deto.DecoupledOptimizer, node: int
) -> tuple[int, int, dict[str, int]]:
    """:data:`STEPS` steps on ``node``'s batches: the rank's and its node's bytes sent over them,
    and the state the rank holds after the last (:func:`held_bytes`)."""
    device = next(model.parameters()).device
    sent = node_sent = 0
    held: dict[str, int] = {}
    for t in range(STEPS):
        x = batch(t, node, device)
        model(x).sub(x.flip(1)).pow(2).mean().backward()
        opt.step()
        held = held_bytes(model, opt)
        opt.zero_grad()
        stats = opt.stats()
        sent, node_sent = sent + stats.bytes_sent, node_sent + stats.node_bytes_sent
    return sent, node_sent, held


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of this rank's part of ``tensors``, each tensor once."""
    unique = {id(t): local_tensor(t) for t in tensors}.values()
    return sum(t.numel() * t.element_size() for t in unique)


def held_bytes(model: nn.Module, opt: deto.DecoupledOptimizer) -> dict[str, int]:
    """The persistent state this rank holds after a step, counted from the live tensors in
    :func:`deto.plan.memory_per_rank`'s kinds: parameter and gradient shards, the base
    optimizer's parameter-sized state, every replicator's buffers (call it before
    ``zero_grad``, while the gradients exist). Parameter-sized is the plan's rule
    (:func:`deto.plan.cost.optimizer_state_copies`): as many elements as the parameter's
    shard. ``optimizer_other`` is the rest of the base optimizer's state (AdamW's ``step``,
    one 4-byte tensor per parameter), which the plan leaves out and the comparison skips."""
    params: list[torch.Tensor] = list(model.parameters())
    sized: list[torch.Tensor] = []
    other: list[torch.Tensor] = []
    for p in params:
        for t in opt.base.state.get(p, {}).values():
            if isinstance(t, torch.Tensor):
                same = local_tensor(t).numel() == local_tensor(p).numel()
                (sized if same else other).append(t)
    return {
        "params": _nbytes(params),
        "grads": _nbytes([p.grad for p in params if p.grad is not None]),
        "optimizer": _nbytes(sized),
        "replicator": _nbytes([t for r in opt.replicators for s in r.state for t in s.values()]),
        "optimizer_other": _nbytes(other),
    }


def planned_bytes(scheme: str, ranks_per_node: int) -> dict[str, int]:
    """What :func:`deto.plan.memory_per_rank` predicts rank 0 holds for ``scheme`` on
    :func:`net` (AdamW, as the runs here) with ``ranks_per_node`` FSDP2 ranks per node."""
    with torch.device("meta"):
        shapes = plan.from_module(net(), "the self-check's net")
    return plan.memory_per_rank(
        plan.Scheme(scheme, SCHEMES[scheme](), torch.optim.AdamW), shapes, ranks_per_node
    )


class CudaPeak:
    """The CUDA allocator's peak within a window of this process, and over the whole process.

    torch keeps one peak counter, which a window must reset to see its own peak; the highest
    peak before each reset is kept, so the process's peak stays what it was."""

    def __init__(self) -> None:
        self._before = 0

    @contextmanager
    def window(self, device: torch.device) -> Iterator[list[int]]:
        """Yields a list that holds the window's peak in bytes once the block ends."""
        self._before = max(self._before, torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        found: list[int] = []
        yield found
        found.append(torch.cuda.max_memory_allocated(device))

    def process_bytes(self, device: torch.device) -> int:
        return max(self._before, torch.cuda.max_memory_allocated(device))


CUDA_PEAK = CudaPeak()
"""This process's one: every window and the process's peak read the same counter."""


def peak_window(device_type: str) -> AbstractContextManager[list[int]]:
    """The CUDA allocator's peak inside the block, on the current GPU (:meth:`CudaPeak.window`);
    on the CPU an empty list: no allocator counts a peak there."""
    if device_type == "cuda":
        return CUDA_PEAK.window(torch.device("cuda", torch.cuda.current_device()))
    return nullcontext([])


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak: the CUDA allocator's on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return CUDA_PEAK.process_bytes(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def one_rank_world(device: str, nodes: int = 2) -> list[DeviceMesh]:
    """A world of one rank in this process (NCCL on CUDA, gloo on the CPU) and, per simulated
    node, a one-rank ``shard`` mesh on a group of its own."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    topology = deto.Topology(nodes=1, ranks_per_node=1, device=device)
    dist.init_process_group(topology.backend, store=dist.HashStore(), rank=0, world_size=1)
    topology.init()
    kind = topology.device_type
    return [DeviceMesh.from_group(dist.new_group([0]), kind, mesh_dim_names=("shard",))
            for _ in range(nodes)]


def fake_nodes_run(
    scheme: str, meshes: list[DeviceMesh], initial: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """``scheme`` across one FakeComm node per mesh, each an FSDP2 model sharded on its mesh.

    Returns node 0's parameters, whether every node's are bitwise equal, the inter-node bytes
    node 0 sent per step, whether FSDP2 made every parameter a DTensor, and the persistent
    state node 0 holds after its last step (:func:`held_bytes`).
    """

    def node(comm: deto.Comm) -> tuple[list[torch.Tensor], int, bool, dict[str, int]]:
        mesh = meshes[comm.rank]
        cuda = mesh.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model = net().to(device)
        model.load_state_dict(initial)
        shard_model(model, mesh)
        base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
        opt = deto.DecoupledOptimizer(base, [SCHEMES[scheme]()], comm, param_names=names)
        sent, _, held = train_steps(model, opt, comm.rank)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        params = [local_tensor(p).detach().cpu().clone() for p in model.parameters()]
        return params, sent, sharded, held

    found = deto.FakeComm(nodes=len(meshes), timeout_s=120).run(node)
    params = [p for p, _, _, _ in found]
    return {
        "params": params[0],
        "replicas_identical": all(
            torch.equal(a, b) for other in params[1:] for a, b in zip(params[0], other, strict=True)
        ),
        "bytes_sent_per_step": found[0][1] // STEPS,
        "sharded": all(sharded for _, _, sharded, _ in found),
        "held_bytes": found[0][3],
    }


def plain_run(scheme: str, device: str, initial: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The same run without FSDP2 (each node one unsharded model): what FSDP2 must match."""

    def node(comm: deto.Comm) -> list[torch.Tensor]:
        model = net().to(device)
        model.load_state_dict(initial)
        base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
        opt = deto.DecoupledOptimizer(base, [SCHEMES[scheme]()], comm, param_names=names)
        train_steps(model, opt, comm.rank)
        return [p.detach().cpu().clone() for p in model.parameters()]

    return deto.FakeComm(nodes=2, timeout_s=120).run(node)[0]


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun launch (``DETO_NODES`` simulated nodes): each scheme through
    :func:`deto.prepare`, then this rank's numbers as JSON in ``--out/rank<R>.json``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    initial = net().state_dict()
    topology = deto.Topology.from_env(device=args.device)
    found: dict[str, Any] = {"nodes": topology.nodes, "ranks_per_node": topology.ranks_per_node}
    device = topology.torch_device
    for scheme in SCHEMES:
        model = net()
        model.load_state_dict(initial)
        with peak_window(device.type) as peak:  # the scheme's own
            model, opt = deto.prepare(model, topology, replicator=SCHEMES[scheme](),
                                      optimizer=torch.optim.AdamW, lr=LR, sign=False)
            _, sent, held = train_steps(model, opt, topology.node)
        report = deto.check_replicas(model, opt, repair=False)
        found[scheme] = {"replicas_identical": not report.diverged,
                         "node_bytes_sent_per_step": sent // STEPS, "held_bytes": held,
                         "planned_bytes": planned_bytes(scheme, topology.ranks_per_node),
                         "peak_bytes": peak[0] if peak else None}
        del model, opt  # the next scheme's peak is its own
    found["peak_memory_mb"] = peak_memory_mb(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(found))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
