"""Helpers shared by the framework integration tests (run inside the rank pool)."""

from __future__ import annotations

import hashlib
import os
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from deto.replicators.base import local_tensor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(local_tensor(value).detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _feed(h, v)
    else:
        h.update(repr(value).encode())


def optimizer_digest(optimizer: torch.optim.Optimizer) -> str:
    """Hash of this rank's optimizer state (every tensor's local shard, every scalar)."""
    h = hashlib.sha256()
    _feed(h, optimizer.state_dict())
    return h.hexdigest()


def torchrun_env() -> None:
    """Give this pool rank the environment torchrun would, which Accelerate and Lightning read
    (the pool's ranks all run on this machine: one launcher with every rank local)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
