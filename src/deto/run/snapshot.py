"""In-memory snapshots: what a restarted rank continues from when the last disk checkpoint is
older than a few steps.

A DCP checkpoint on disk is a collective, checksummed and costs seconds; snapshotting every few
steps that way would cost more than the work it protects. A snapshot is one file per rank in
shared memory (``/dev/shm``: RAM, outliving the process but not the machine): this rank's local
shards of the model and the optimizer state, its RNG and the trainer's history, written with
``torch.save`` and renamed into place, with no collective. After torch elastic restarts the
ranks (same world, same shard positions), each loads its own file, so the work lost to a dead
rank is bounded by ``--snapshot-every`` rather than ``--checkpoint-every``. A node whose machine
is lost takes its snapshots with it; the disk checkpoint is the fallback.

Each rank keeps its two newest snapshots: a rank killed while writing step N still holds N - K,
and the ranks resume from the newest step that every rank holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from deto.replicators.base import local_tensor
from deto.run.checkpoint import restore_state, training_state
from deto.run.ranks import all_gather

logger = logging.getLogger(__name__)

KEEP = 2


def snapshot_root() -> Path:
    """Shared memory where the machine has it, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def snapshot_dir(run_dir: str | Path) -> Path:
    """Where the snapshots of the run writing to ``run_dir`` live: named by the run directory,
    so every attempt of the run (and every rank on a machine) finds the same place."""
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return snapshot_root() / f"deto-snapshots-{key}"


def _file(where: Path, rank: int, step: int) -> Path:
    return where / f"rank{rank:05d}-step{step:08d}.pt"


def _own_steps(where: Path, rank: int) -> list[int]:
    prefix = f"rank{rank:05d}-step"
    if not where.is_dir():
        return []
    return sorted(
        int(p.name[len(prefix) : -len(".pt")]) for p in where.glob(f"{prefix}*.pt")
    )


def save_snapshot(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    opt: Any,
    *,
    history: dict[str, Any],
    rank_state: dict[str, Any],
) -> Path | None:
    """Write this rank's snapshot of ``step`` (no collective); keep the newest :data:`KEEP`.

    Returns its file, or ``None`` with a warning when it cannot be written (shared memory is
    often small in containers): the run goes on, protected by its older snapshots and its
    checkpoints.
    """
    where = snapshot_dir(run_dir)
    rank = dist.get_rank()
    state = tree_map(
        lambda v: local_tensor(v).detach().clone() if isinstance(v, torch.Tensor) else v,
        training_state(model, opt),
    )
    final = _file(where, rank, step)
    tmp = final.with_suffix(".incomplete")
    try:
        where.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"step": step, "state": state, "history": history, "rank_state": rank_state,
             "rng": torch.get_rng_state()},
            tmp,
        )
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # a full /dev/shm must not end a long run
        tmp.unlink(missing_ok=True)
        logger.warning(
            "could not keep the snapshot of step %d in %s (%s); a restart falls back to an "
            "older snapshot or the last checkpoint", step, where, exc,
        )
        return None
    for old in _own_steps(where, rank)[:-KEEP]:
        _file(where, rank, old).unlink(missing_ok=True)
    return final


def newest_common_step(run_dir: str | Path) -> int | None:
    """The newest step every rank holds a snapshot of (a collective), or ``None``."""
    held = all_gather(set(_own_steps(snapshot_dir(run_dir), dist.get_rank())))
    common = set.intersection(*held)
    return max(common) if common else None


def load_snapshot(
    run_dir: str | Path, step: int, model: nn.Module, opt: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore this rank's snapshot of ``step``; return ``(history, rank_state)`` as saved."""
    saved = torch.load(_file(snapshot_dir(run_dir), dist.get_rank(), step), weights_only=True)
    template = training_state(model, opt)
    leaves, spec = tree_flatten(template)
    values, saved_spec = tree_flatten(saved["state"])
    if saved_spec != spec:
        raise ValueError(f"the snapshot of step {step} does not fit this model and optimizer")
    restored = []
    for leaf, value in zip(leaves, values, strict=True):
        if isinstance(leaf, torch.Tensor):
            local_tensor(leaf).copy_(value)
            restored.append(leaf)
        else:
            restored.append(value)
    restore_state(model, opt, tree_unflatten(restored, spec))
    torch.set_rng_state(saved["rng"])
    return saved["history"], saved["rank_state"]


def drop_snapshots(run_dir: str | Path) -> None:
    """Remove this rank's snapshots of the run, and their directory once it is empty: a run
    that ended, or a fresh one that must not continue an older run's."""
    where = snapshot_dir(run_dir)
    rank = dist.get_rank()
    for step in _own_steps(where, rank):
        _file(where, rank, step).unlink(missing_ok=True)
    for stale in where.glob(f"rank{rank:05d}-*.incomplete"):
        stale.unlink(missing_ok=True)
    if where.is_dir() and not any(where.iterdir()):
        shutil.rmtree(where, ignore_errors=True)
