"""Replication schemes, one module each, behind the :class:`Replicator` interface."""

from deto.replicators.base import REGISTRY, MomentumReplicator, Replicator, Slot, make_replicator
from deto.replicators.demo import DeMo
from deto.replicators.diloco import DiLoCo
from deto.replicators.full import Full, NoReplication
from deto.replicators.subset import RandomSubset, Slicing, Striding, SubsetReplicator

__all__ = [
    "REGISTRY",
    "DeMo",
    "DiLoCo",
    "Full",
    "MomentumReplicator",
    "NoReplication",
    "RandomSubset",
    "Replicator",
    "Slicing",
    "Slot",
    "Striding",
    "SubsetReplicator",
    "make_replicator",
]
