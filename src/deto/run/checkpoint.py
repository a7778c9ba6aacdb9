"""``deto train``'s checkpoints, written through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``<out>/checkpoints/step_<N>/`` holding:

* a DCP checkpoint of ``{"model": ..., "optim": ...}`` as DCP's ``get_state_dict`` returns them,
  the same path any user of DCP takes (for deto's optimizer this holds the base optimizer's
  state and the replicators' buffers and counters, see :mod:`deto.optim_state`), saved one
  entry per node by :mod:`deto.checkpoint`;
* ``rank<r>.pt`` per rank: what only the trainer knows about the rank (its RNG state, the
  training loss since the last record);
* ``trainer.json``: the history (metrics so far, timings, traffic) and the config;
* ``COMPLETE``, written last. The checkpoint is written in a temporary directory and renamed
  into place, so a crash mid-save never leaves a directory that loads as a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deto.checkpoint import CheckpointError, load_state, save_state
from deto.run import report
from deto.run.config import AUTO_SCHEME, KNOBS, STRUCTURAL, TrainConfig
from deto.run.integrity import write_manifest
from deto.topology import Topology

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """deto's optimizer is a torch optimizer; the HSDP baseline wraps one as ``base``."""
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.base


def training_state(model: nn.Module, opt: Any) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as DCP's ``get_state_dict`` gives them: the tensors are
    the live ones (a load into them restores the run in place)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _torch_optimizer(opt))
    return {"model": model_sd, "optim": optim_sd}


def restore_state(model: nn.Module, opt: Any, state: dict[str, Any]) -> None:
    """Hand a loaded :func:`training_state` back to the model and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model, _torch_optimizer(opt),
        model_state_dict=state["model"], optim_state_dict=state["optim"],
    )


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    opt: Any,
    topo: Topology,
    *,
    history: dict[str, Any],
    config: dict[str, Any],
    rank_state: dict[str, Any],
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` (a collective); return its directory.

    ``history`` (JSON) is the trainer's record of the run, ``rank_state`` this rank's extras.
    """
    rank = dist.get_rank()
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        save_state(tmp, training_state(model, opt), topo)
    except CheckpointError:
        if rank == 0:  # a collective failure: every rank is done writing; give the space back
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    own = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "rng": torch.get_rng_state(),
        **rank_state,
    }
    torch.save(own, tmp / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        report.write_json(tmp / "trainer.json", {"history": history, "config": config})
        write_manifest(tmp)  # checksums of every file, verified before a resume
        marker = {"step": step, "world_size": dist.get_world_size(), "config": config}
        report.write_json(tmp / COMPLETE, marker)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        logger.info("checkpoint saved: %s", final)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(
    path: Path, model: nn.Module, opt: Any, topo: Topology
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the model, the optimizer and this rank's RNG (a collective).

    Returns ``(history, rank_state)`` as given to :func:`save_checkpoint`.
    """
    restore_state(model, opt, load_state(path, training_state(model, opt), topo))
    own = torch.load(path / f"rank{dist.get_rank():05d}.pt", weights_only=True)
    torch.set_rng_state(own.pop("rng"))
    for key in ("rank", "world_size"):
        own.pop(key)
    history = json.loads((path / "trainer.json").read_text())["history"]
    return history, own


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself if complete, else the latest complete one inside
    it (or inside its ``checkpoints/``). Raises ``ValueError`` if there is none."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Checkpoint not found: {path}")
    if (path / COMPLETE).is_file():
        return path
    for where in (path, path / CHECKPOINTS):
        if where.is_dir():
            found = sorted(
                p for p in where.iterdir()
                if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()
            )
            if found:
                return found[-1]
    if path.name.startswith("step_") or path.name.endswith(".incomplete"):
        raise ValueError(f"Not a complete checkpoint (no {COMPLETE} marker): {path}")
    raise ValueError(f"No complete checkpoint in {path}")


def checkpoint_step(path: Path) -> int:
    """The step of the complete checkpoint ``path``."""
    return int(json.loads((path / COMPLETE).read_text())["step"])


def _marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Unreadable checkpoint marker in {path}: {exc}") from None
    if not isinstance(marker, dict):
        raise ValueError(f"Unreadable checkpoint marker in {path}: not a JSON object")
    return marker


def saved_config(path: Path) -> dict[str, Any]:
    """The config the complete checkpoint ``path`` was saved with (flat, as config.json)."""
    return dict(_marker(path).get("config", {}))


def check_resumable(path: Path, cfg: TrainConfig) -> int:
    """Check a checkpoint fits ``cfg``; return its step. ``ValueError`` explains a mismatch."""
    marker = _marker(path)
    saved = marker.get("config", {})
    now = cfg.to_dict()
    wrong = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in STRUCTURAL if saved.get(k) != now[k]]
    if wrong:
        raise ValueError(f"Checkpoint {path} does not fit this run: it has {', '.join(wrong)}")
    step = marker.get("step")
    if not isinstance(step, int):
        raise ValueError(f"Unreadable checkpoint marker in {path}: it has no step")
    if step >= cfg.steps:
        raise ValueError(
            f"Checkpoint {path} is at step {step}: nothing to do for --steps {cfg.steps}"
        )
    chosen = KNOBS if cfg.scheme == AUTO_SCHEME else ()  # auto's knobs: the checkpoint's
    changed = sorted(
        k for k in now
        if k not in STRUCTURAL and k not in ("out", "resume", "steps", *chosen)
        and saved.get(k) != now[k]
    )
    if changed:
        logger.warning(
            "resuming with changed settings: %s", ", ".join(f"{k}={now[k]!r}" for k in changed)
        )
    return step
