"""The configuration of one ``deto train`` run: a frozen, validated dataclass.

Values are resolved in this order, later winning: built-in defaults, the task's defaults, the
``--scheme`` preset, the TOML config file, command-line flags. A config file is a flat TOML
table whose keys are the long flag names (``ranks_per_node = 2`` or ``ranks-per-node = 2``);
an unknown key is an error, like an unknown flag.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deto.train.presets import (
    DEFAULT_SCHEME,
    OPTIMIZERS,
    PRESETS,
    REPLICATOR_OPTIONS,
    default_lr,
)

TASKS = ("lm", "vision")
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
BLOCK_MODES = ("2d", "1d")
VALUE_DTYPES = ("fp32", "bf16", "int8")

TASK_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "lm": {"steps": 300, "batch_size": 16, "d_model": 128, "layers": 2, "heads": 4},
    "vision": {"steps": 200, "batch_size": 32, "d_model": 64, "layers": 2, "heads": 4},
}
LM_ONLY = frozenset({"seq_len", "eval_samples"})
"""Keys that only mean something for ``--task lm``."""

STRUCTURAL = (
    "scheme", "task", "nodes", "ranks_per_node", "seq_len", "d_model", "layers", "heads",
    "optimizer", "precision",
)
"""Keys a resumed run must share with its checkpoint (they shape the saved state)."""


def _f(default: Any, help: str, *, choices: tuple[str, ...] | None = None, meta: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": meta})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; every field is also a ``--flag`` and a config-file key.

    ``None`` means "the default of the scheme/task" before :func:`resolve`, and "the
    replicator's own default" for replicator options after it.
    """

    scheme: str = _f(DEFAULT_SCHEME, "replication scheme preset (see below)", choices=tuple(PRESETS))
    task: str = _f("lm", "lm: byte-level GPT on the Python standard library's sources; "
                   "vision: small ViT on scikit-learn's 8x8 digits", choices=TASKS)
    nodes: int = _f(2, "number of nodes R (size of the replicate axis)", meta="N")
    ranks_per_node: int = _f(2, "ranks per node S (size of the shard axis)", meta="N")
    steps: int = _f(None, "total optimizer steps (lm: 300, vision: 200)", meta="N")
    batch_size: int = _f(None, "sequences/images per rank per step (lm: 16, vision: 32)", meta="N")
    seq_len: int = _f(64, "context length in bytes (lm)", meta="N")
    d_model: int = _f(None, "transformer width (lm: 128, vision: 64)", meta="N")
    layers: int = _f(None, "transformer layers (2)", meta="N")
    heads: int = _f(None, "attention heads (4)", meta="N")
    optimizer: str = _f(None, "base optimizer (preset's default)", choices=tuple(OPTIMIZERS))
    lr: float = _f(None, "peak learning rate (preset's tuned default)", meta="LR")
    sign: bool = _f(None, "use the sign of the replicated gradient (sign-SGD)")
    weight_decay: float = _f(0.0, "decoupled weight decay", meta="WD")
    warmup: int = _f(20, "linear warm-up steps", meta="N")
    lr_schedule: str = _f("cosine", "after warm-up: cosine decay to 10%% of --lr at --steps, "
                          "or constant", choices=LR_SCHEDULES)
    grad_clip: float = _f(0.0, "clip the node's gradient norm to this (0: off)", meta="NORM")
    topk: int = _f(None, "DeMo: coefficients kept per chunk (presets: 14; DeMo's own: 32)", meta="K")
    chunk: int = _f(None, "DeMo: chunk edge; 2-D blocks are chunk x chunk (presets: 32; DeMo's own: 64)", meta="C")
    blocks: str = _f(None, "DeMo: DCT blocks, 2d (default) or 1d", choices=BLOCK_MODES)
    values: str = _f(None, "DeMo: wire format of the values: fp32, bf16, or int8 with a "
                     "per-block scale (presets: int8; DeMo's own: fp32)", choices=VALUE_DTYPES)
    decay: float = _f(None, "decoupled momentum decay of demo/random/striding/slicing (0.999)", meta="BETA")
    rate: float = _f(None, "random/striding/slicing: fraction of rows sent (1/16)", meta="R")
    every: int = _f(None, "replicate every N steps (diloco: inner steps H, default 25)", meta="N")
    outer_lr: float = _f(None, "DiLoCo: outer learning rate (0.7)", meta="LR")
    outer_momentum: float = _f(None, "DiLoCo: outer Nesterov momentum (0.9)", meta="M")
    eval_every: int = _f(50, "evaluate on the validation split every N steps (and at the end)", meta="N")
    eval_samples: int = _f(256, "validation windows of --seq-len bytes (lm)", meta="N")
    log_every: int = _f(10, "write a metrics line every N steps", meta="N")
    seed: int = _f(0, "seed of the model's initialisation and of the batches", meta="N")
    out: str = _f(None, "output directory (default: runs/<timestamp>-<scheme>)", meta="DIR")
    checkpoint_every: int = _f(0, "save a checkpoint every N steps and at the end (0: never)", meta="N")
    resume: str = _f(None, "continue from a checkpoint, or the newest whole one in a run "
                     "directory; auto: the newest in --out if there is one", meta="DIR")
    max_restarts: int = _f(0, "restart the ranks up to N times after a failure, from the newest "
                           "whole checkpoint (with --checkpoint-every)", meta="N")
    timeout: float = _f(60.0, "seconds a collective waits for a silent peer before the run "
                        "fails", meta="SECONDS")
    check_replicas_every: int = _f(0, "compare the nodes' replicas every N steps and repair "
                                   "divergence (0: never)", meta="N")
    precision: str = _f("fp32", "fp32, or bf16 compute with fp32 parameters and reductions",
                        choices=PRECISIONS)
    device: str = _f("auto", "auto: CPU for the simulated cluster, CUDA under torchrun if "
                     "available", choices=DEVICES)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        preset = PRESETS[self.scheme]
        if preset.ranks_per_node is not None and self.ranks_per_node != preset.ranks_per_node:
            raise ValueError(
                f"Invalid topology: scheme {self.scheme!r} needs ranks_per_node="
                f"{preset.ranks_per_node}, got {self.ranks_per_node}"
            )
        if self.d_model is not None and self.heads is not None and self.d_model % self.heads:
            raise ValueError(f"Invalid heads: {self.heads} (d_model={self.d_model} is not divisible by it)")
        if self.topk is not None and self.chunk is not None:
            nominal = self.chunk if self.blocks == "1d" else self.chunk * self.chunk
            if self.topk > nominal:
                raise ValueError(f"Invalid topk: {self.topk} (a chunk of {self.chunk} has {nominal} coefficients)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def replicator_options(self) -> dict[str, Any]:
        """Options for the scheme's replicator: those set, among the ones it accepts."""
        accepted = PRESETS[self.scheme].options
        return {k: getattr(self, k) for k in sorted(accepted) if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_INT_MIN = {
    "nodes": 1, "ranks_per_node": 1, "steps": 1, "batch_size": 1, "seq_len": 1, "d_model": 1,
    "layers": 1, "heads": 1, "warmup": 0, "topk": 1, "chunk": 1, "every": 1, "eval_every": 1,
    "eval_samples": 1, "log_every": 1, "seed": 0, "checkpoint_every": 0, "max_restarts": 0,
    "check_replicas_every": 0,
}
# (low, high, low_open, high_open)
_FLOAT_RANGE = {
    "lr": (0.0, math.inf, True, True),
    "weight_decay": (0.0, math.inf, False, True),
    "grad_clip": (0.0, math.inf, False, True),
    "decay": (0.0, 1.0, False, True),
    "rate": (0.0, 1.0, True, False),
    "outer_lr": (0.0, math.inf, True, True),
    "outer_momentum": (0.0, 1.0, False, True),
    "timeout": (0.0, math.inf, True, True),
}


def _check_field(f: dataclasses.Field[Any], value: Any) -> None:
    name = f.name
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None:
        if value not in choices:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(choices)})")
    elif name in _INT_MIN:
        if not isinstance(value, int) or isinstance(value, bool) or value < _INT_MIN[name]:
            raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {_INT_MIN[name]})")
    elif name in _FLOAT_RANGE:
        low, high, low_open, high_open = _FLOAT_RANGE[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"Invalid {name}: {value!r} (must be a number in {interval})")
    elif name == "sign":
        if not isinstance(value, bool):
            raise ValueError(f"Invalid sign: {value!r} (must be true or false)")
    elif name in ("out", "resume"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"Invalid {name}: {value!r} (must be a path)")
    else:  # pragma: no cover - every field is covered above
        raise AssertionError(f"field {name} has no check")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML config file; keys may use ``-`` or ``_``; unknown keys are an error."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"Config file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"Config file is a directory: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Invalid TOML in {path}: {exc}") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ValueError(f"Invalid [{key}] in {path}: tables are not allowed (the file is flat)")
        if name not in FIELDS:
            raise ValueError(f"Unknown key in {path}: {key!r} (valid: {', '.join(FIELDS)})")
        out[name] = value
    return out


def resolve(overrides: Mapping[str, Any]) -> TrainConfig:
    """Build the config from explicitly set values (config file merged with flags).

    Raises ``ValueError`` with a one-line message for any invalid, unknown or inapplicable
    value (e.g. ``--topk`` with ``--scheme hsdp``).
    """
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"Unknown option(s): {', '.join(unknown)}")
    scheme = overrides.get("scheme", DEFAULT_SCHEME)
    _check_field(FIELDS["scheme"], scheme)
    task = overrides.get("task", "lm")
    _check_field(FIELDS["task"], task)
    preset = PRESETS[scheme]

    for key in sorted(overrides):
        if key in REPLICATOR_OPTIONS and key not in preset.options and overrides[key] is not None:
            users = sorted(p.name for p in PRESETS.values() if key in p.options)
            raise ValueError(
                f"{flag(key)} does not apply to scheme {scheme!r} (it applies to: {', '.join(users)})"
            )
        if key in LM_ONLY and task != "lm":
            raise ValueError(f"{flag(key)} applies to --task lm only, not {task!r}")
    if preset.replicator is None and overrides.get("sign"):
        raise ValueError(f"--sign does not apply to scheme {scheme!r} (no deto optimizer)")

    values: dict[str, Any] = {**TASK_DEFAULTS[task], **preset.defaults, **overrides}
    if "lr" not in overrides:
        opt, sign = values["optimizer"], values["sign"]
        if opt in OPTIMIZERS and isinstance(sign, bool):
            values["lr"] = default_lr(scheme, task, opt, sign)
    return TrainConfig(**values)
