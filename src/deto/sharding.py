"""FSDP2 over one node's accelerators, and nothing else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

MIXED_PRECISION = {
    None: None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def default_blocks(module: nn.Module) -> list[nn.Module]:
    """The members of every ``nn.ModuleList`` (transformer layers, in most models)."""
    return [m for ml in module.modules() if isinstance(ml, nn.ModuleList) for m in ml]


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: str | None = None,
    blocks: Callable[[nn.Module], list[nn.Module]] = default_blocks,
) -> nn.Module:
    """Apply ``fully_shard`` per block, then to the root, over ``mesh``.

    With the 1-D ``shard`` mesh this is FlexDeMo's intra-node sharding (gradients are averaged
    inside the node only); with the 2-D ``(replicate, shard)`` mesh it is torch's own HSDP.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"Invalid mixed_precision: {mixed_precision!r} (expected None or 'bf16')"
        )
    policy = MIXED_PRECISION[mixed_precision] or MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
