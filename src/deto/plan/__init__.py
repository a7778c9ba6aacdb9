"""The cost model: inter-node bytes, step time and memory per rank of every scheme, predicted
without running anything (no process group, no parameters allocated).

Bytes follow the rules the replicators and :mod:`deto.comm` follow, so they are exact (the unit
tests hold them to the counts of real replicators on simulated nodes); times are a model: the
bytes over the bandwidth, the latency per ring step, and a compute time per step given by the
caller. See docs/plan.md.
"""

from deto.plan.cost import (
    Link,
    Prediction,
    Scheme,
    crossover,
    memory_per_rank,
    predict,
    predict_traffic,
)
from deto.plan.shapes import (
    ModelShapes,
    from_module,
    from_param_count,
    llama_like,
    local_shapes,
    shard_shape,
)
from deto.plan.traffic import Collective, Traffic, traffic

__all__ = [
    "Collective",
    "Link",
    "ModelShapes",
    "Prediction",
    "Scheme",
    "Traffic",
    "crossover",
    "llama_like",
    "local_shapes",
    "memory_per_rank",
    "from_module",
    "from_param_count",
    "predict",
    "predict_traffic",
    "shard_shape",
    "traffic",
]
