"""Saving and loading a state through ``torch.distributed.checkpoint`` (DCP), one entry per node.

Nodes whose replicas differ (``none``, DiLoCo between synchronisations, each node's DeMo
``delta``) must each get their own state back, so every tensor not already spread over both
mesh axes is saved with a node dimension. Both ``deto train``'s checkpoints and the framework
integrations write their model and optimizer through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from deto.optim_state import per_node
from deto.replicators.base import local_tensor
from deto.topology import Topology


@torch.no_grad()
def one_entry_per_node(
    state: dict[str, Any], topo: Topology
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """``state`` with every tensor not yet spread over both mesh axes given a node dimension.

    The new entries share memory with the old ones, so a DCP load into them restores the old
    ones in place; the second value maps each new entry back to the tensor it stands for.
    """
    originals: dict[int, torch.Tensor] = {}

    def lift(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if isinstance(value, DTensor) and value.device_mesh.ndim == 2:
            return value  # already one entry per node (deto's buffers) or a 2-D HSDP tensor
        entry = per_node(local_tensor(value).detach(), value, topo.mesh)
        originals[id(entry)] = value
        return entry

    return tree_map(lift, state), originals


class CheckpointError(RuntimeError):
    """A DCP save or load failed on some rank, told by the failure that explains it.

    DCP gathers every rank's failure into a :class:`CheckpointException`, which derives from
    ``BaseException``: it escapes ``except Exception`` (and torch elastic's error files), and its
    text is one traceback per rank. This is the same failure as an ordinary exception whose
    first line is the telling cause, with the original attached as ``__cause__``.
    """


def _telling(failures: dict[int, Any]) -> tuple[int, BaseException]:
    """The rank and exception that explain a collective failure: an ``OSError`` (a full disk,
    a missing file) before the errors it causes elsewhere, this rank's before another's."""
    own = dist.get_rank() if dist.is_initialized() else 0
    ranked = sorted(failures.items(), key=lambda kv: (not isinstance(kv[1][0], OSError),
                                                       kv[0] != own, kv[0]))
    rank, (exc, _trace) = ranked[0]
    return rank, exc


@contextlib.contextmanager
def _ordinary_errors(action: str, path: str | Path) -> Iterator[None]:
    try:
        yield
    except CheckpointException as exc:
        rank, cause = _telling(exc.failures)
        ranks = ", ".join(map(str, sorted(exc.failures)))
        raise CheckpointError(
            f"{action} {path} failed: {type(cause).__name__}: {cause} (on rank {rank}; "
            f"failed on ranks {ranks})"
        ) from exc


def save_state(path: str | Path, state: dict[str, Any], topo: Topology) -> None:
    """Write ``state`` (as DCP's ``get_state_dict`` returns it) under ``path``; a collective.

    Raises :class:`CheckpointError` if any rank fails to write its part.
    """
    entries, _ = one_entry_per_node(state, topo)
    with _ordinary_errors("saving", path):
        dcp.save(entries, checkpoint_id=str(path))


def load_state(path: str | Path, state: dict[str, Any], topo: Topology) -> dict[str, Any]:
    """Load into ``state`` what :func:`save_state` wrote (a collective); return the loaded state.

    ``state`` names what to load (its keys may be a subset of the saved ones) and gives the
    shapes; its tensors are filled in place, other values (counters, settings) come back in the
    returned dictionary only. Raises :class:`CheckpointError` if any rank fails to read.
    """
    entries, originals = one_entry_per_node(state, topo)
    with _ordinary_errors("loading", path):
        dcp.load(entries, checkpoint_id=str(path))
    return tree_map(lambda v: originals.get(id(v), v), entries)
