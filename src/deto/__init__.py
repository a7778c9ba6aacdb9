"""deto: decoupled, network-aware distributed training (DeToNATION / FlexDeMo) for PyTorch.

Inside a node FSDP2 shards everything; between nodes a *replicator* decides what crosses the
slow network and when.
"""

from deto.comm import Comm, CommStats
from deto.optim import DecoupledOptimizer
from deto.prepare import prepare
from deto.replicas import ReplicaCheck, check_replicas
from deto.replicators import (
    DeMo,
    DiLoCo,
    Full,
    GradReplicator,
    MomentumReplicator,
    NoReplication,
    ParamReplicator,
    RandomSubset,
    Replicator,
    Slicing,
    StreamingDiLoCo,
    Striding,
    make_replicator,
)
from deto.schedule import SyncSchedule
from deto.sharding import shard
from deto.testing import FakeComm
from deto.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "Comm",
    "CommStats",
    "DeMo",
    "DecoupledOptimizer",
    "DiLoCo",
    "FakeComm",
    "Full",
    "GradReplicator",
    "MomentumReplicator",
    "NoReplication",
    "ParamReplicator",
    "RandomSubset",
    "ReplicaCheck",
    "Replicator",
    "Slicing",
    "StreamingDiLoCo",
    "Striding",
    "SyncSchedule",
    "Topology",
    "check_replicas",
    "make_replicator",
    "prepare",
    "shard",
]
