"""Replication schemes, one module each, behind the :class:`GradReplicator` and
:class:`ParamReplicator` interfaces."""

from deto.replicators.base import (
    REGISTRY,
    GradReplicator,
    MomentumReplicator,
    ParamReplicator,
    Replicator,
    ReplicatorSpec,
    Slot,
    build_replicators,
    make_replicator,
)
from deto.replicators.demo import DeMo
from deto.replicators.diloco import DiLoCo
from deto.replicators.full import Full, NoReplication
from deto.replicators.subset import RandomSubset, Slicing, Striding, SubsetReplicator

__all__ = [
    "REGISTRY",
    "DeMo",
    "DiLoCo",
    "Full",
    "GradReplicator",
    "MomentumReplicator",
    "NoReplication",
    "ParamReplicator",
    "RandomSubset",
    "Replicator",
    "ReplicatorSpec",
    "Slicing",
    "Slot",
    "Striding",
    "SubsetReplicator",
    "build_replicators",
    "make_replicator",
]
