"""The configuration of one ``deto train`` run: a frozen, validated dataclass.

Values are resolved in this order, later winning: built-in defaults, the task's defaults, the
``--scheme`` preset, the TOML config file, command-line flags. A config file is a flat TOML
table whose keys are the long flag names (``ranks_per_node = 2`` or ``ranks-per-node = 2``);
an unknown key is an error, like an unknown flag.

The replicator's settings are nested: ``TrainConfig.replicator`` is the scheme's options object
(:class:`deto.replicators.DeMoOptions`, ...). Their knobs are flat flags and keys all the same
(``--topk``, ``topk = 14``): :data:`KNOBS` collects them from the options classes of the
schemes, with their bounds, choices and help.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deto.plan.auto import DEFAULT_BUDGET
from deto.replicators import Options
from deto.replicators.options import MAX_LR, check_knob, knob
from deto.run.presets import (
    AUTO_SCHEME,
    DEFAULT_SCHEME,
    OPTIMIZERS,
    PRESETS,
    SIGN_LR_PER_DOUBLING,
    Preset,
    default_lr,
)
from deto.topology import MAX_TIMEOUT_S, MIN_TIMEOUT_S

TASKS = ("lm", "vision")
MODEL_TASKS: Mapping[str, str] = {
    "gpt": "lm", "t5": "lm", "llama": "lm", "vit": "vision", "resnet": "vision",
}
"""Every ``--model`` and the task it trains on; the first of a task is that task's default."""
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

TASK_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "lm": {"steps": 300, "batch_size": 16, "d_model": 128, "layers": 2, "heads": 4},
    "vision": {"steps": 200, "batch_size": 32, "d_model": 64, "layers": 2, "heads": 4},
}
HF_MODELS = frozenset({"t5", "llama"})
MODEL_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"resnet": {"d_model": 16}}
LM_ONLY = frozenset({"seq_len", "eval_samples"})
"""Keys that only mean something for ``--task lm``."""

FT_ONLY = ("lighthouse", "node_index")
"""Keys that only mean something with ``--ft``."""
NOT_WITH_FT = ("check_replicas_every",)
"""Keys a run on torchft does not support yet (:meth:`TrainConfig._check_ft`)."""

STRUCTURAL = (
    "scheme", "task", "model", "nodes", "ranks_per_node", "seq_len", "d_model", "layers", "heads",
    "optimizer", "precision",
)
"""Keys a resumed run must share with its checkpoint (they shape the saved state)."""


SEED_MAX = 2**64 - 1
"""The largest seed torch takes (``torch.manual_seed``)."""
MAX_WEIGHT_DECAY = 1e3
"""The largest decoupled weight decay (``p *= 1 - lr * wd``): far above those in use (0.01 to
0.1); finite, like every float flag, so that a slip is refused when the flag is read."""
MAX_GRAD_CLIP = 1e9
"""The largest gradient-norm clip: no gradient these models make comes near it, so it clips
nothing; finite, like every float flag."""


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    meta: str | None = None,
    **bounds: Any,
) -> Any:
    """A field declared like a replicator knob (:func:`deto.replicators.options.knob`): a
    number's ``low``/``high`` bounds (and ``low_open``/``high_open``) are checked when the
    config is built and when ``deto train`` parses the flag."""
    return knob(default, help, choices=choices, metavar=meta, **bounds)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; every field is also a ``--flag`` and a config-file key.

    ``None`` means "the default of the scheme/task" before :func:`resolve`, and "the
    replicator's own default" for replicator options after it.
    """

    scheme: str = _f(
        DEFAULT_SCHEME, "replication scheme preset (see below)", choices=tuple(PRESETS)
    )
    task: str = _f("lm", "lm: byte-level GPT on the Python standard library's sources; "
                   "vision: small ViT on scikit-learn's 8x8 digits (default: --model's task)",
                   choices=TASKS)
    model: str = _f(None, "architecture: gpt (byte-level GPT), t5 (Hugging Face T5, span "
                    "corruption), llama (Hugging Face Llama) for lm; vit, resnet (ResNet-18, "
                    "--d-model is its first stage's width, 16) for vision (default: gpt, vit)",
                    choices=tuple(MODEL_TASKS))
    nodes: int = _f(2, "number of nodes R (size of the replicate axis)", meta="N", low=1)
    ranks_per_node: int = _f(2, "ranks per node S (size of the shard axis)", meta="N", low=1)
    steps: int = _f(None, "total optimizer steps (lm: 300, vision: 200)", meta="N", low=1)
    batch_size: int = _f(
        None, "sequences/images per rank per step (lm: 16, vision: 32)", meta="N", low=1
    )
    seq_len: int = _f(64, "context length in bytes (lm)", meta="N", low=1)
    d_model: int = _f(None, "transformer width (lm: 128, vision: 64)", meta="N", low=1)
    layers: int = _f(None, "transformer layers (2)", meta="N", low=1)
    heads: int = _f(None, "attention heads (4)", meta="N", low=1)
    optimizer: str = _f(None, "base optimizer (preset's default)", choices=tuple(OPTIMIZERS))
    lr: float = _f(None, "peak learning rate (preset's tuned default; with sign, divided by "
                   f"{SIGN_LR_PER_DOUBLING:g} per doubling of --d-model above the task's default)",
                   meta="LR", low=0.0, low_open=True, high=MAX_LR)
    sign: bool = _f(None, "use the sign of the replicated gradient (sign-SGD)")
    weight_decay: float = _f(
        0.0, "decoupled weight decay", meta="WD", low=0.0, high=MAX_WEIGHT_DECAY
    )
    warmup: int = _f(20, "linear warm-up steps", meta="N", low=0)
    lr_schedule: str = _f("cosine", "after warm-up: cosine decay to 10%% of --lr at --steps, "
                          "or constant", choices=LR_SCHEDULES)
    grad_clip: float = _f(
        0.0, "clip the node's gradient norm to this (0: off)", meta="NORM", low=0.0,
        high=MAX_GRAD_CLIP,
    )
    replicator: Options | None = None  # the scheme's options, see KNOBS (None: the preset's)
    comm_budget: float = _f(DEFAULT_BUDGET, "with --scheme auto: the share of the compute time "
                            "the exchange may add to a step (0.1: 10%%)", meta="SHARE", low=0.0,
                            low_open=True, high=10.0)
    eval_every: int = _f(
        50, "evaluate on the validation split every N steps (and at the end)", meta="N", low=1
    )
    eval_samples: int = _f(256, "validation windows of --seq-len bytes (lm)", meta="N", low=1)
    log_every: int = _f(10, "write a metrics line every N steps", meta="N", low=1)
    seed: int = _f(
        0, "seed of the model's initialisation and of the batches", meta="N", low=0,
        high=SEED_MAX,
    )
    out: str = _f(None, "output directory (default: runs/<timestamp>-<scheme>)", meta="DIR")
    checkpoint_every: int = _f(
        0, "save a checkpoint every N steps and at the end (0: never)", meta="N", low=0
    )
    snapshot_every: int = _f(0, "also keep an in-memory snapshot every N steps (one file per "
                             "rank in /dev/shm); a restart continues from it when it is newer "
                             "than the last checkpoint (0: off)", meta="N", low=0)
    resume: str = _f(None, "continue from a checkpoint, or the newest whole one in a run "
                     "directory; auto: the newest in --out if there is one", meta="DIR")
    max_restarts: int = _f(0, "restart the ranks up to N times after a failure, from the newest "
                           "whole checkpoint (with --checkpoint-every)", meta="N", low=0)
    timeout: float = _f(60.0, "seconds a collective waits for a silent peer before the run "
                        "fails", meta="SECONDS", low=MIN_TIMEOUT_S, high=MAX_TIMEOUT_S)
    check_replicas_every: int = _f(0, "compare the nodes' replicas every N steps and repair "
                                   "divergence (0: never)", meta="N", low=0)
    ft: bool = _f(False, "run the replicate axis on torchft: when a node dies the others go on "
                  "without it, and a restarted node (--max-restarts) rejoins at the current step "
                  "with a live peer's state; every node is its own torch world "
                  "(pip install 'deto[ft]'; see docs/fault-tolerance.md)")
    lighthouse: str = _f(None, "with --ft under torchrun: the torchft Lighthouse, "
                         "http://HOST:PORT (default: $TORCHFT_LIGHTHOUSE; the simulated cluster "
                         "starts its own)", meta="URL")
    node_index: int = _f(None, "with --ft under torchrun: this node's place on the replicate "
                         "axis, 0 to --nodes - 1 (it picks the node's data and output folder)",
                         meta="K", low=0)
    precision: str = _f("fp32", "fp32, or bf16 compute with fp32 parameters and reductions",
                        choices=PRECISIONS)
    device: str = _f("auto", "auto: CPU for the simulated cluster, CUDA under torchrun if "
                     "available", choices=DEVICES)
    stop_at: int = _f(None, "stop after step N, keeping the learning-rate schedule of --steps "
                      "(a prefix of a longer run, bit for bit)", meta="N", low=1)
    perturb_init_ulp: int = _f(0, "move every initial weight N ulps up (measures the run-to-run "
                               "noise floor; 0: off)", meta="N", low=0)

    def __post_init__(self) -> None:
        for f in FIELDS.values():
            _check_field(f, getattr(self, f.name))
        preset = PRESETS[self.scheme]
        if self.replicator is None:  # frozen: take the preset's options once
            object.__setattr__(self, "replicator", preset.options)
        if type(self.replicator) is not type(preset.options):
            raise ValueError(
                f"Invalid replicator: {self.replicator!r} (scheme {self.scheme!r} takes "
                f"{type(preset.options).__name__})"
            )
        if preset.ranks_per_node is not None and self.ranks_per_node != preset.ranks_per_node:
            raise ValueError(
                f"Invalid topology: scheme {self.scheme!r} needs ranks_per_node="
                f"{preset.ranks_per_node}, got {self.ranks_per_node}"
            )
        if self.model is None:  # frozen: fill in the task's default model once
            object.__setattr__(self, "model", default_model(self.task))
        if MODEL_TASKS[self.model] != self.task:
            fits = ", ".join(m for m, t in MODEL_TASKS.items() if t == self.task)
            raise ValueError(
                f"Invalid model: {self.model!r} does not fit task {self.task!r} (it fits: {fits})"
            )
        if self.model == "t5" and self.seq_len < 2:
            raise ValueError(f"Invalid seq_len: {self.seq_len} (span corruption needs >= 2 bytes)")
        if self.d_model is not None and self.heads is not None and self.d_model % self.heads:
            raise ValueError(
                f"Invalid heads: {self.heads} (d_model={self.d_model} is not divisible by it)"
            )
        if self.stop_at is not None and self.steps is not None and self.stop_at > self.steps:
            raise ValueError(f"Invalid stop_at: {self.stop_at} (after the last step, {self.steps})")
        if self.ft:
            self._check_ft()
        else:
            for name in FT_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"{flag(name)} applies with --ft only")

    def _check_ft(self) -> None:
        """What a run on torchft cannot do yet, each as one line."""
        if PRESETS[self.scheme].replicator is None:
            raise ValueError(
                f"--ft needs a deto replicator, and scheme {self.scheme!r} is torch's own HSDP "
                "(--scheme full exchanges the same)"
            )
        for name in NOT_WITH_FT:
            if getattr(self, name):
                raise ValueError(
                    f"{flag(name)} does not apply with --ft yet (it compares the replicas "
                    "over the static mesh)"
                )
        if getattr(self.replicator, "overlap", False):
            raise ValueError("--overlap does not apply with --ft (torchft's group exchanges "
                             "synchronously)")
        if tau := getattr(self.replicator, "overlap_steps", 0):
            raise ValueError(
                f"--overlap-steps {tau} does not apply with --ft "
                "(torchft's group exchanges synchronously, and an exchange in flight would "
                "cross a change of quorum; --overlap-steps 0 merges each in its own step)"
            )
        if self.model == "resnet":
            raise ValueError("--model resnet does not apply with --ft yet: its BatchNorm "
                             "statistics would not be averaged across the nodes")
        if self.node_index is not None and self.node_index >= self.nodes:
            raise ValueError(
                f"Invalid node_index: {self.node_index} (the nodes are 0 to {self.nodes - 1})"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def replicator_options(self) -> dict[str, Any]:
        """Keyword arguments for the scheme's replicator: its knobs that differ from the
        replicator's own defaults."""
        return self.replicator.changed() if self.replicator is not None else {}

    def to_dict(self) -> dict[str, Any]:
        """Flat, as flags and config files have it: every key of :data:`KEYS`, a knob the
        scheme does not have as ``None``."""
        own = {f.name: getattr(self, f.name) for f in FIELDS.values()}
        knobs = dataclasses.asdict(self.replicator) if self.replicator is not None else {}
        return {k: own[k] if k in own else knobs.get(k) for k in KEYS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`."""
        own = {k: v for k, v in values.items() if k in FIELDS}
        knobs = {k: v for k, v in values.items() if k in KNOBS and v is not None}
        return cls(**own, replicator=_options(own.get("scheme", DEFAULT_SCHEME), knobs))


def default_model(task: str) -> str:
    return next(m for m, t in MODEL_TASKS.items() if t == task)


def _check_field(f: dataclasses.Field[Any], value: Any) -> None:
    name = f.name
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None:
        if value not in choices:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(choices)})")
    elif f.type in ("int", "float"):
        check_knob(f, value)
    elif f.type in ("bool", bool):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be true or false)")
    elif name == "lighthouse":
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^/:\s]+:\d+/?", value):
            raise ValueError(f"Invalid lighthouse: {value!r} (must be http://HOST:PORT)")
    elif name in ("out", "resume"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"Invalid {name}: {value!r} (must be a path)")
    else:  # pragma: no cover - every field is covered above
        raise AssertionError(f"field {name} has no check")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "replicator"}
"""The run's own settings: one flag and config key each."""


def _knobs() -> dict[str, dataclasses.Field[Any]]:
    knobs: dict[str, dataclasses.Field[Any]] = {}
    for preset in PRESETS.values():
        if preset.options is not None:
            for name, f in preset.options.knobs().items():
                knobs.setdefault(name, f)
    return knobs


KNOBS = _knobs()
"""The replicator knobs of every scheme, by name (first declaration): one flag and key each."""


def _keys() -> dict[str, dataclasses.Field[Any]]:
    keys: dict[str, dataclasses.Field[Any]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "replicator":
            keys.update(KNOBS)  # the knobs stand where the nested options do
        else:
            keys[f.name] = f
    return keys


KEYS = _keys()
"""Every flag and config key, in ``--help`` order."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _knob_takers() -> list[Preset]:
    """The presets whose knobs a user sets (auto chooses its own)."""
    return [p for p in PRESETS.values() if p.options is not None and p.name != AUTO_SCHEME]


def _has(options: Options | None, knob: str) -> bool:
    return options is not None and knob in options.knobs()


def key_help(name: str) -> str:
    """``--help`` of a key; a knob's adds its value in every scheme that has it, and where the
    schemes' options classes describe it differently (DeMo's ``topk`` counts DCT
    coefficients, DiLoCo's the pseudo-gradient's values), each description with its schemes."""
    if name not in KNOBS:
        return str(KEYS[name].metadata["help"])
    described: dict[str, dict[Any, list[str]]] = {}
    for p in _knob_takers():
        if p.options is not None and _has(p.options, name):
            text = str(p.options.knobs()[name].metadata["help"])
            values = described.setdefault(text, {})
            values.setdefault(getattr(p.options, name), []).append(p.name)
    return "; ".join(f"{text} ({_by_scheme(values)})" for text, values in described.items())


def _by_scheme(values: Mapping[Any, list[str]]) -> str:
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in values.items())


def _options(scheme: str, knobs: Mapping[str, Any]) -> Options | None:
    """The scheme's preset options with ``knobs`` changed; ``ValueError`` for a bad value."""
    preset = PRESETS[scheme]
    for key in sorted(knobs):
        if not _has(preset.options, key):
            users = sorted(p.name for p in _knob_takers() if _has(p.options, key))
            raise ValueError(
                f"{flag(key)} does not apply to scheme {scheme!r} (it applies to: "
                f"{', '.join(users)})"
            )
    if preset.options is None:
        return None
    return dataclasses.replace(preset.options, **knobs)


def _check_auto(scheme: str, overrides: Mapping[str, Any], knobs: Mapping[str, Any]) -> None:
    """``--scheme auto`` picks the DeMo knobs itself, and ``--comm-budget`` is its only knob."""
    if scheme != AUTO_SCHEME:
        if "comm_budget" in overrides:
            raise ValueError(f"--comm-budget applies to --scheme auto only, not {scheme!r}")
        return
    if knobs:
        names = ", ".join(flag(k) for k in sorted(knobs))
        raise ValueError(
            f"{names} does not apply to --scheme auto (it picks DeMo's settings from the link; "
            "--scheme flexdemo takes them as given)"
        )
    if overrides.get("ft"):
        raise ValueError("--scheme auto does not apply with --ft yet (it measures the link "
                         "over the static mesh before the first step)")


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
            raise ValueError(
                f"Invalid [{key}] in {path}: tables are not allowed (the file is flat)"
            )
        if name not in KEYS:
            raise ValueError(f"Unknown key in {path}: {key!r} (valid: {', '.join(KEYS)})")
        out[name] = value
    return out


def resolve(overrides: Mapping[str, Any]) -> TrainConfig:
    """Build the config from explicitly set values (config file merged with flags).

    Raises ``ValueError`` with a one-line message for any invalid, unknown or inapplicable
    value (e.g. ``--topk`` with ``--scheme hsdp``).
    """
    unknown = sorted(set(overrides) - set(KEYS))
    if unknown:
        raise ValueError(f"Unknown option(s): {', '.join(unknown)}")
    scheme = overrides.get("scheme", DEFAULT_SCHEME)
    _check_field(FIELDS["scheme"], scheme)
    model = overrides.get("model")
    _check_field(FIELDS["model"], model)
    task = overrides.get("task", MODEL_TASKS[model] if model is not None else "lm")
    _check_field(FIELDS["task"], task)
    if model is None:
        model = default_model(task)
    if model in HF_MODELS and importlib.util.find_spec("transformers") is None:
        raise ValueError(f"--model {model} needs Hugging Face transformers: pip install 'deto[hf]'")
    preset = PRESETS[scheme]

    knobs = {k: v for k, v in overrides.items() if k in KNOBS and v is not None}
    _check_auto(scheme, overrides, knobs)
    replicator = _options(scheme, knobs)
    for key in sorted(overrides):
        if key in LM_ONLY and task != "lm":
            raise ValueError(f"{flag(key)} applies to --task lm only, not {task!r}")
    if preset.replicator is None and overrides.get("sign"):
        raise ValueError(f"--sign does not apply to scheme {scheme!r} (no deto optimizer)")

    own = {k: v for k, v in overrides.items() if k in FIELDS}
    shape = {**TASK_DEFAULTS[task], **MODEL_DEFAULTS.get(model, {})}
    values: dict[str, Any] = {**shape, **preset.defaults, **own, "task": task, "model": model}
    if "lr" not in overrides:
        opt, sign, width = values["optimizer"], values["sign"], values["d_model"]
        if opt in OPTIMIZERS and isinstance(sign, bool) and isinstance(width, int) and width > 0:
            values["lr"] = default_lr(scheme, task, opt, sign, width / shape["d_model"])
    return TrainConfig(**values, replicator=replicator)
