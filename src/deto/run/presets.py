"""``--scheme`` presets: which replicator, which base optimizer, and tuned defaults for each.

A preset only supplies defaults; every value can be overridden by the config file or a flag.
Its replicator settings are an instance of that replicator's options class (the knobs a
``--scheme`` accepts are that class's fields).
Learning rates were tuned on the embedded tasks (``deto train`` with no other flags, and
``--task vision``); see docs/cli.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from deto.replicators import (
    REGISTRY,
    DeMoOptions,
    DiLoCoOptions,
    Options,
    OverlapOptions,
    StreamingDiLoCoOptions,
    SubsetOptions,
)

OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = MappingProxyType(
    {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
)
"""``--optimizer``: the base optimizers (torch's SGD without momentum, AdamW)."""

def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Preset:
    """One ``--scheme``.

    Attributes:
        name: the ``--scheme`` value.
        summary: one line for ``--help`` and the docs.
        replicator: registry name of the deto replicator, or ``None`` for torch-native HSDP
            (FSDP2 over the 2-D mesh, no deto optimizer).
        options: the replicator's settings, an instance of ``REGISTRY[replicator].Options``
            (``None`` with no replicator).
        defaults: other config values this scheme sets (optimizer, sign, topology).
        lr: tuned learning rate per task for the preset's own optimizer and sign.
        ranks_per_node: if set, the only ranks-per-node this scheme allows.
    """

    name: str
    summary: str
    replicator: str | None
    options: Options | None = None
    defaults: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    lr: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        expected = None if self.replicator is None else REGISTRY[self.replicator].Options
        if type(self.options) is not (type(None) if expected is None else expected):
            raise TypeError(
                f"Preset {self.name!r}: options {self.options!r} do not fit replicator "
                f"{self.replicator!r}"
            )


# Learning rates for a base optimizer other than the preset's own (after --optimizer/--sign):
# starting points, not tuned per scheme.
GENERIC_LR: dict[tuple[str, bool], dict[str, float]] = {
    ("sgd", True): {"lm": 1.5e-3, "vision": 3e-3},
    ("sgd", False): {"lm": 0.1, "vision": 0.1},
    ("adamw", False): {"lm": 1e-3, "vision": 3e-3},
    ("adamw", True): {"lm": 1e-4, "vision": 3e-4},
}

_ADAMW_LR = _frozen({"lm": 1e-3, "vision": 3e-3})
_SIGN_LR = _frozen({"lm": 1.5e-3, "vision": 3e-3})
_SUBSET_LR = _frozen({"lm": 1e-2, "vision": 3e-2})  # only 1/16 of the rows move per step
# FlexDeMo runs DeMo()'s own defaults (1-D chunks of 64, top 4, int2 values: 1/32 of HSDP's
# bytes), chosen from a loss-vs-bytes frontier over four models, two schedules and two seeds, where
# they held HSDP's loss in every cell (docs/benchmarks.md). A preset tuned on one task does not
# generalize: 2-D 32x32 blocks keeping 14 coefficients as int8 (1/110) matched HSDP on the
# embedded LM task but trailed by 9.5% on a 4-layer GPT and 76% on ViT. That setting stays as the
# bandwidth-first preset ``flexdemo-lean``, for links where 1/100 matters more than the loss.
_DEMO = DeMoOptions()
_LEAN_DEMO = DeMoOptions(blocks="2d", chunk=32, topk=14, values="int8")
# Plain DeMo (4 nodes x 1 rank) at the lean settings ends at 2.43 on the LM task: each node's
# gradient comes from one rank's batch, and the top 14 of four noisier nodes trail. It keeps
# DeMo's 32 coefficients per block, fp32, on 32x32 blocks (2.08, HSDP's loss or better); the
# frontier sweep covered 2 nodes x 2 ranks only, so this preset was not re-chosen from it.
_PLAIN_DEMO = DeMoOptions(blocks="2d", chunk=32, topk=32, values="fp32")

AUTO_SCHEME = "auto"
"""The preset whose DeMo knobs are chosen at start-up (:mod:`deto.run.auto`), not given."""

PRESETS: Mapping[str, Preset] = _frozen({
    p.name: p
    for p in (
        Preset(
            "hsdp",
            "the baseline: torch-native HSDP (FSDP2 over the 2-D mesh) + AdamW, full gradient "
            "all-reduce across nodes every step",
            None,
            defaults=_frozen({"optimizer": "adamw", "sign": False}),
            lr=_ADAMW_LR,
        ),
        Preset(
            "full",
            "deto's Full replicator (all-reduce of the sharded gradient) + AdamW, sign off",
            "full",
            OverlapOptions(),
            _frozen({"optimizer": "adamw", "sign": False}),
            _ADAMW_LR,
        ),
        Preset(
            "flexdemo",
            "FlexDeMo: FSDP2 inside a node, DeMo across nodes at DeMo()'s defaults (top 4 DCT "
            "coefficients of each 64-chunk of the decoupled momentum, int2; 1/32 of hsdp's "
            "bytes), sign-SGD",
            "demo",
            _DEMO,
            _frozen({"optimizer": "sgd", "sign": True}),
            _SIGN_LR,
        ),
        Preset(
            AUTO_SCHEME,
            "FlexDeMo at the DeMo setting the link can carry: measures the link and the "
            "compute at start-up and takes the best-quality setting whose exchange keeps the "
            "step within --comm-budget of the compute, compressing harder or overlapping only "
            "where it must (docs/plan.md)",
            "demo",
            _DEMO,
            _frozen({"optimizer": "sgd", "sign": True}),
            _SIGN_LR,
        ),
        Preset(
            "flexdemo-lean",
            "FlexDeMo at 1/110 of hsdp's bytes (2-D 32x32 blocks, top 14, int8 values), "
            "sign-SGD: bandwidth first; matches hsdp on the embedded LM task, trails it elsewhere",
            "demo",
            _LEAN_DEMO,
            _frozen({"optimizer": "sgd", "sign": True}),
            _SIGN_LR,
        ),
        Preset(
            "flexdemo-adamw",
            "FlexDeMo's replication with an AdamW base optimizer, sign off (momentum decay 0: "
            "AdamW keeps its own)",
            "demo",
            replace(_DEMO, decay=0.0),
            _frozen({"optimizer": "adamw", "sign": False}),
            _ADAMW_LR,
        ),
        Preset(
            "demo",
            "plain DeMo: one rank per node (every rank its own replica), sign-SGD",
            "demo",
            _PLAIN_DEMO,
            _frozen({"optimizer": "sgd", "sign": True, "nodes": 4, "ranks_per_node": 1}),
            _SIGN_LR,
            ranks_per_node=1,
        ),
        Preset(
            "diloco",
            "DiLoCo: local AdamW steps, every --every steps an outer Nesterov step on the "
            "averaged pseudo-gradient",
            "diloco",
            DiLoCoOptions(every=25),
            _frozen({"optimizer": "adamw", "sign": False}),
            _frozen({"lm": 1e-3, "vision": 1e-3}),
        ),
        Preset(
            "sparseloco",
            "SparseLoCo: DiLoCo whose pseudo-gradient sends the top 64 of each 64x64 block "
            "(2-bit values, error feedback decaying by 0.95, outer lr 1, no outer momentum: "
            "Templar's published settings) every --every steps",
            "diloco",
            DiLoCoOptions(every=25, compress="topk", outer_lr=1.0, outer_momentum=0.0),
            _frozen({"optimizer": "adamw", "sign": False}),
            _frozen({"lm": 1e-3, "vision": 1e-3}),
        ),
        Preset(
            "streaming-diloco",
            "Streaming DiLoCo: DiLoCo on 2 parameter fragments synced at staggered steps, each "
            "exchange hidden under 1 inner step, 4-bit outer gradients (--fragments, "
            "--overlap-steps, --values)",
            "streaming-diloco",
            StreamingDiLoCoOptions(every=25, fragments=2, overlap_steps=1),
            _frozen({"optimizer": "adamw", "sign": False}),
            _frozen({"lm": 1e-3, "vision": 1e-3}),
        ),
        Preset(
            "random",
            "decoupled momentum, all-reduce of a shared-seed random subset of rows (--rate), "
            "sign-SGD",
            "random",
            SubsetOptions(),
            _frozen({"optimizer": "sgd", "sign": True}),
            _SUBSET_LR,
        ),
        Preset(
            "striding",
            "decoupled momentum, all-reduce of every 1/--rate-th row with a cycling offset, "
            "sign-SGD",
            "striding",
            SubsetOptions(),
            _frozen({"optimizer": "sgd", "sign": True}),
            _SUBSET_LR,
        ),
        Preset(
            "slicing",
            "decoupled momentum, all-reduce of a moving contiguous window of rows (--rate), "
            "sign-SGD",
            "slicing",
            SubsetOptions(),
            _frozen({"optimizer": "sgd", "sign": True}),
            _SUBSET_LR,
        ),
        Preset(
            "none",
            "no inter-node communication: every node trains alone (a control), AdamW",
            "none",
            Options(),
            _frozen({"optimizer": "adamw", "sign": False}),
            _ADAMW_LR,
        ),
    )
})

DEFAULT_SCHEME = "flexdemo"


SIGN_LR_PER_DOUBLING = 1.5
"""A sign-based step moves every weight by the learning rate, so its effect on a layer's output
grows with the layer's fan-in: the tuned sign-SGD rates hold at each task's default width and
are divided by this for every doubling of the width above it. Measured on the byte GPT at the
constant schedule (docs/benchmarks.md): at width 256, 1.5e-3 (the width-128 rate) ended 8.1%
above HSDP's loss and 1e-3 within 1.5%; at width 512, 7e-4 ended below 1e-3, both below
HSDP's."""


def default_lr(
    scheme: str, task: str, optimizer: str, sign: bool, width_ratio: float = 1.0
) -> float:
    """The tuned learning rate of ``scheme`` on ``task``, or a generic one for another optimizer;
    ``width_ratio``: the model's width over the task's default width (sign-based steps only)."""
    preset = PRESETS[scheme]
    if (optimizer, sign) == (preset.defaults["optimizer"], preset.defaults["sign"]):
        lr = preset.lr[task]
    else:
        lr = GENERIC_LR[(optimizer, sign)][task]
    # narrower models keep the tuned rate: only wider ones were measured
    return lr / SIGN_LR_PER_DOUBLING ** math.log2(max(width_ratio, 1.0)) if sign else lr
