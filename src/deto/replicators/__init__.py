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
from deto.replicators.demo import DeMo, DeMoOptions
from deto.replicators.diloco import DiLoCo, DiLoCoOptions
from deto.replicators.full import Full, NoReplication
from deto.replicators.options import (
    KnobTypeError,
    MomentumOptions,
    Options,
    OverlapOptions,
    ReplicatorOptions,
)
from deto.replicators.streaming import StreamingDiLoCo, StreamingDiLoCoOptions
from deto.replicators.subset import (
    RandomSubset,
    Slicing,
    Striding,
    SubsetOptions,
    SubsetReplicator,
)

__all__ = [
    "REGISTRY",
    "DeMo",
    "DeMoOptions",
    "DiLoCo",
    "DiLoCoOptions",
    "Full",
    "GradReplicator",
    "KnobTypeError",
    "MomentumOptions",
    "MomentumReplicator",
    "NoReplication",
    "Options",
    "OverlapOptions",
    "ParamReplicator",
    "RandomSubset",
    "Replicator",
    "ReplicatorOptions",
    "ReplicatorSpec",
    "Slicing",
    "Slot",
    "StreamingDiLoCo",
    "StreamingDiLoCoOptions",
    "Striding",
    "SubsetOptions",
    "SubsetReplicator",
    "build_replicators",
    "make_replicator",
]
