"""Train with Hugging Face ``transformers.Trainer``: deto shards the model inside each node and
owns everything that crosses nodes; the Trainer keeps the rest (data, loop, LR schedule,
gradient clipping, accumulation, logging, evaluation, checkpoints).

    trainer = DetoTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                          topology=deto.Topology.from_env(), replicator=deto.DeMo())
    trainer.train()                               # or trainer.train(resume_from_checkpoint=True)

Why a Trainer subclass: on several processes Accelerate wraps the model in
``DistributedDataParallel``, which cannot hold an FSDP2-sharded model and would all-reduce
every gradient across nodes, the traffic deto exists to avoid. Accelerate's own FSDP2 path
accepts an already sharded model but is GPU-only and checkpoints a plain optimizer. So
:class:`DetoTrainer` marks the model as sharded before it reaches Accelerate (the Trainer's
``is_distributed_loading_by_transformers`` mode: no wrap, FSDP2-aware gradient accumulation)
and replaces the Trainer's model and optimizer checkpoint methods with sharded ones. Those are
private methods, so the versions are checked (:data:`TRANSFORMERS_VERSIONS`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments

from deto.comm import CommStats
from deto.integrations import _checkpoint
from deto.integrations._compat import check_world, find_decoupled, is_sharded
from deto.optim import DecoupledOptimizer
from deto.prepare import ReplicatorSpec
from deto.sharding import shard
from deto.topology import Topology

logger = logging.getLogger(__name__)

TRANSFORMERS_VERSIONS = (Version("5.24"), Version("6"))
"""The transformers releases :class:`DetoTrainer` supports: at least the first, below the second."""

CHECKPOINT_DIR = "deto"
"""The sharded model and optimizer state inside each of the Trainer's ``checkpoint-N`` folders."""

SCHEDULER_NAME = "scheduler.pt"  # the Trainer's own name, so its resume logic finds it

# Trainer methods DetoTrainer overrides although they are private: checked to exist at start.
_PRIVATE_METHODS = (
    "_save",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
    "_load_from_checkpoint",
    "_load_best_model",
)


def check_transformers() -> None:
    """Raise ``RuntimeError`` unless the installed transformers is one DetoTrainer supports."""
    low, high = TRANSFORMERS_VERSIONS
    found = Version(transformers.__version__)
    missing = [m for m in _PRIVATE_METHODS if not callable(getattr(Trainer, m, None))]
    if not low <= found < high or missing:
        raise RuntimeError(
            f"deto.integrations.hf supports transformers >={low},<{high} (it replaces private "
            f"Trainer methods), found {found}"
            + (f" without {', '.join(missing)}" if missing else "")
            + f": pip install 'transformers>={low},<{high}'"
        )


class InterNodeTrafficCallback(TrainerCallback):
    """Adds this node's inter-node traffic since the previous log to the Trainer's training logs.

    ``inter_node_bytes_sent``/``inter_node_bytes_received`` add up the node's ranks (what
    crossed the slow network), ``inter_node_seconds`` is this rank's time in those collectives,
    each summed over the optimizer steps since the previous log. Works with any Trainer whose
    optimizer is a :class:`deto.DecoupledOptimizer`; put it first in the callbacks so that the
    reporters (console, TensorBoard, W&B, ...) see the values.
    """

    def __init__(self) -> None:
        self._total = CommStats()
        self._last_step = 0

    def on_optimizer_step(
        self, args: TrainingArguments, state: Any, control: Any, optimizer: Any = None, **_: Any
    ) -> None:
        opt = find_decoupled(optimizer)
        if opt.step_count != self._last_step:  # a step skipped by a grad scaler sends nothing
            self._total += opt.stats()
            self._last_step = opt.step_count

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **_: Any
    ) -> None:
        if logs is None or "loss" not in logs:  # training logs only, not evaluation's
            return
        metrics = {
            "inter_node_bytes_sent": self._total.node_bytes_sent,
            "inter_node_bytes_received": self._total.node_bytes_received,
            "inter_node_seconds": self._total.seconds,
        }
        logs.update(metrics)
        if state.log_history:  # the Trainer appends its copy of the logs before the callbacks
            state.log_history[-1].update(metrics)
        self._total = CommStats()


def cpu_args(args: TrainingArguments, topology: Topology) -> TrainingArguments:
    """``args`` with ``use_cpu=True`` when the topology runs on CPU.

    Without it the Trainer (through Accelerate) treats a CPU process as a world of one, even
    under torchrun: every rank would read the same batches and write the same checkpoint.
    """
    if topology.device_type != "cpu" or args.use_cpu:
        return args
    return dataclasses.replace(args, use_cpu=True)


class DetoTrainer(Trainer):
    """A ``transformers.Trainer`` training a deto-sharded model with a deto optimizer.

    Takes the ``Trainer``'s arguments (all but ``model`` and ``args`` by keyword), and:

    Args:
        topology: the cluster shape (default: ``deto.Topology.from_env()``, torchrun's).
        replicator: a registry name, a replicator or a list of them (as in ``deto.prepare``);
            ``replicator_options`` configure one given by name.
        sign: use the sign of the replicated gradient (FlexDeMo's sign-SGD: pair with
            ``TrainingArguments(optim="sgd")``). Off by default, for the Trainer's AdamW.
        mixed_precision: FSDP2 mixed precision when DetoTrainer shards the model (None, "bf16").
        nonfinite: what to do with non-finite gradients (see ``deto.DecoupledOptimizer``).

    The model is sharded with ``deto.shard`` unless it already is (by ``deto.shard`` or by
    ``fully_shard`` over ``topology.mesh["shard"]``). The base optimizer is the one the Trainer
    builds from ``args`` (``optim``, ``learning_rate``, ``weight_decay`` with its usual
    no-decay groups, betas ...), wrapped in a :class:`deto.DecoupledOptimizer`; or pass your
    own ``optimizers=(DecoupledOptimizer, scheduler_or_None)``. A checkpoint holds the full
    weights (``model.safetensors``, for ``from_pretrained``) and, under
    :data:`CHECKPOINT_DIR`, every rank's shard of the model and optimizer, replicators included.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        topology: Topology | None = None,
        replicator: ReplicatorSpec = "demo",
        replicator_options: dict[str, Any] | None = None,
        sign: bool = False,
        mixed_precision: str | None = None,
        nonfinite: str = "raise",
        **trainer_kwargs: Any,
    ) -> None:
        check_transformers()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if args.fsdp or args.deepspeed:
            raise ValueError(
                "DetoTrainer shards the model itself: leave TrainingArguments' fsdp and "
                "deepspeed unset"
            )
        optimizer = trainer_kwargs.get("optimizers", (None, None))[0]
        if optimizer is not None:
            find_decoupled(optimizer)  # TypeError for any other optimizer
        self.topology = topology if topology is not None else Topology.from_env()
        args = cpu_args(args, self.topology)
        if is_sharded(model):
            if mixed_precision is not None:
                raise ValueError("mixed_precision applies only when DetoTrainer shards the model")
        else:
            shard(model, self.topology, mixed_precision=mixed_precision)
        self._deto_options = dict(
            replicator=replicator, sign=sign, nonfinite=nonfinite, **(replicator_options or {})
        )
        self._resumed = False  # the model holds a checkpoint's parameters, each node its own
        super().__init__(model=model, args=args, **trainer_kwargs)
        check_world(
            "DetoTrainer: the Trainer", self.args.world_size, self.args.process_index,
            self.args.device.type, self.topology,
            "launch with torchrun and build the Topology with Topology.from_env()",
        )  # fmt: skip
        # The model owns its placement and gradient reduction: no DDP wrap, FSDP2-aware no_sync.
        self.is_distributed_loading_by_transformers = True
        self.callback_handler.callbacks.insert(0, InterNodeTrafficCallback())

    @property
    def sharded_model(self) -> nn.Module:
        """The model (the Trainer types it optional, for ``model_init``, which is not supported)."""
        assert self.model is not None
        return self.model

    @property
    def decoupled_optimizer(self) -> DecoupledOptimizer:
        """The deto optimizer (``self.optimizer`` is Accelerate's wrapper of it once training)."""
        return find_decoupled(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            base = super().create_optimizer(model)
            # The Trainer loads a resumed model before it builds the optimizer: node 0's
            # parameters must not overwrite the others' (they differ between DiLoCo's syncs,
            # and under Streaming DiLoCo always).
            self.optimizer = DecoupledOptimizer.from_model(
                self.sharded_model, self.topology, base, sync_initial=not self._resumed,
                **self._deto_options,
            )
        return self.optimizer

    # -- checkpoints: every rank writes and reads its own shards ---------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the full weights (gathered inside the node) where ``from_pretrained`` reads them."""
        full = get_model_state_dict(
            self.sharded_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.args.should_save:
            self._save(output_dir, state_dict=full)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        _checkpoint.save(
            Path(output_dir) / CHECKPOINT_DIR,
            self.sharded_model,
            self.decoupled_optimizer,
            self.topology,
        )
        assert self.lr_scheduler is not None  # created before the first step
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint) / CHECKPOINT_DIR
        _checkpoint.load_optimizer(
            folder, self.sharded_model, self.decoupled_optimizer, self.topology
        )
        assert self.lr_scheduler is not None  # created before the Trainer loads a checkpoint
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        folder = Path(resume_from_checkpoint) / CHECKPOINT_DIR
        if not _checkpoint.exists(folder):
            raise ValueError(
                f"No deto checkpoint in {resume_from_checkpoint} (expected {CHECKPOINT_DIR}/; "
                "checkpoints saved with save_only_model=True cannot be resumed)"
            )
        target = self.sharded_model if model is None else model
        _checkpoint.load_model(folder, target, self.topology)
        self._resumed = self._resumed or target is self.sharded_model

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        assert best is not None  # the Trainer calls this only when it recorded one
        logger.info("Loading the best model from %s", best)
        self._load_from_checkpoint(best)
