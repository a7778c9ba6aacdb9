"""How a DecoupledOptimizer's state is laid out in torch's optimizer format.

``{"state": {param_id: {...}}, "param_groups": [...]}``, the base optimizer's entries first:

* every parameter's dict holds the base optimizer's entries (``exp_avg``, ...) and then each
  replicator's buffers for it under ``deto.<position>.<name>.<key>``, e.g. ``deto.0.demo.delta``;
* every param group holds the base optimizer's settings and then the counters:
  ``deto.step`` (the optimizer's step) and ``deto.<position>.<name>.<counter>``.

Those are the two places ``torch.distributed.checkpoint.state_dict``'s get/set functions carry
through (they keep each parameter's dict and each group's keys, and drop any other top-level
key), so DCP saves and loads them like any optimizer's state.

A replicator's buffer belongs to this node (DeMo's ``delta`` differs between nodes), so in a
sharded run it is stored as a DTensor over the whole ``(replicate, shard)`` mesh with one more
leading dimension, one entry per node: DCP then keeps every node's buffer instead of keeping one
copy of what it would take for a replicated tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

PREFIX = "deto."
STEP_KEY = "deto.step"


def replicator_key(position: int, name: str, key: str) -> str:
    """The state-dict key of a replicator's buffer or counter."""
    return f"{PREFIX}{position}.{name}.{key}"


def is_deto_key(key: object) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def per_node(local: torch.Tensor, param: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """``local`` (a buffer shaped like this rank's shard of ``param``) as checkpoint entry.

    Without a mesh (one process per node, or simulated nodes) the buffer is its own entry.
    With the 2-D mesh it is a DTensor of shape ``(nodes, *param.shape)`` sharing ``local``'s
    memory, so a DCP load into it fills the buffer in place.
    """
    if mesh is None:
        return local
    if isinstance(param, DTensor) and local.shape != param.to_local().shape:
        return _per_rank_flat(local, mesh)
    if isinstance(param, DTensor):
        inner: list[Placement] = []
        for p in param.placements:
            if isinstance(p, Shard):
                inner.append(Shard(p.dim + 1))
            elif isinstance(p, Replicate):
                inner.append(p)
            else:
                raise ValueError(f"Cannot checkpoint state of a parameter placed as {p}")
        shape = (mesh.size(0), *param.shape)
    else:
        inner = [Replicate() for _ in range(mesh.ndim - 1)]
        shape = (mesh.size(0), *local.shape)
    return DTensor.from_local(
        local.unsqueeze(0),
        mesh,
        [Shard(0), *inner],
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def _per_rank_flat(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A buffer not shaped like its parameter's shard (DeMo's padded DCT coefficients) as a
    ``(nodes, ranks per node, n)`` entry: one flat row per rank, zero-padded to the longest row
    of the node (one tiny all-reduce inside the node), so DCP keeps every rank's own.

    Unlike :func:`per_node`'s other entries it is a copy: it comes back through
    :func:`from_saved`, which takes the row's first ``local.numel()`` values.
    """
    longest = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=mesh.get_group(1))
    row = local.new_zeros(1, 1, int(longest.item()))
    row[0, 0, : local.numel()] = local.reshape(-1)
    shape = (mesh.size(0), mesh.size(1), row.shape[-1])
    return DTensor.from_local(
        row, mesh, [Shard(0), Shard(1)], run_check=False,
        shape=torch.Size(shape), stride=_contiguous_stride(shape),
    )


def from_saved(value: torch.Tensor, buffer: torch.Tensor, what: str) -> torch.Tensor:
    """This rank's part of a saved entry made by :func:`per_node`, checked against ``buffer``."""
    local = value.to_local() if isinstance(value, DTensor) else value
    flat_row = local.dim() == 3 and local.shape[:2] == (1, 1) and buffer.dim() != 2
    if local.dim() == buffer.dim() + 1 and len(local) == 1:  # a per-node entry, or its local
        local = local[0]
    if local.shape != buffer.shape:  # a flat row of :func:`_per_rank_flat`
        row = local.reshape(-1) if flat_row or local.shape[0] == 1 else local
        if row.dim() == 1 and row.numel() >= buffer.numel():
            local = row[: buffer.numel()].view(buffer.shape)
    if local.shape != buffer.shape:
        raise ValueError(
            f"Saved {what} has shape {tuple(local.shape)}, this rank's buffer {tuple(buffer.shape)}"
        )
    return local


@torch.no_grad()
def init_base_state(base: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's lazily built state, as DCP's state-dict functions do.

    A state dict used as the template of a DCP load must already hold every entry the
    checkpoint has. torch builds it with one step at learning rate 0 on zero gradients, which
    leaves the parameters unchanged; this runs that step on the base optimizer alone (no
    replicator, no communication). Like torch, it does nothing when gradients exist.
    """
    params = [p for g in base.param_groups for p in g["params"]]
    if base.state or any(p.grad is not None for p in params):
        return
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in base.param_groups]
    for g in base.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        base.step()
    finally:
        for g, lr in zip(base.param_groups, lrs, strict=True):
            g["lr"] = lr
        base.zero_grad(set_to_none=True)
