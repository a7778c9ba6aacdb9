"""Train with torchtitan: deto shards the model inside each node and owns everything that crosses
nodes; torchtitan keeps the rest (its models, the loop, LR schedules, gradient clipping,
metrics and its DCP checkpointer).

    topology = deto.Topology.from_env()
    config = Trainer.Config(
        model_spec=deto_model_spec(model_registry("8B"), topology),
        optimizer=DetoOptimizersContainer.Config(topology=topology, replicator="demo",
                                                 param_groups=default_adamw(3e-4).param_groups),
        parallelism=parallelism(topology),
        ...)

Two of torchtitan's extension points carry it, the ones torchft's fault-tolerant trainer uses
too: a model spec's ``parallelize_fn`` (:func:`deto_parallelize`: FSDP2 over the node's ranks
only, where torchtitan's would be HSDP over every rank) and a subclass of its
``OptimizersContainer`` (:class:`DetoOptimizersContainer`: each optimizer torchtitan builds,
wrapped in a :class:`deto.DecoupledOptimizer`). Nothing else of torchtitan is replaced.

torchtitan's ``Trainer`` needs an accelerator (see docs/integrations.md for where it stops on a
CPU-only machine), so this module also holds what lets the same model, optimizer container,
LR schedulers and checkpointer train on CPU: :class:`DenseFlexAttention` (torchtitan's
attention masks computed with dense SDPA, whose backward runs on CPU), and the synthetic data
(:class:`RandomTokens`, :class:`ByteTokenizer`) that needs no files from a hub.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from packaging.version import Version
from torch import nn
from torch.distributed.fsdp import FSDPModule

from deto import extras

try:
    import torchtitan
    from torch.nn.attention.flex_attention import BlockMask, create_mask
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.utils import (
        get_flat_optim_state_dict,
        load_flat_optim_state_dict,
    )
    from torchtitan.components.tokenizer import BaseTokenizer
    from torchtitan.config.configs import ParallelismConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.common.attention import FlexAttention
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.tools import utils as titan_utils
except ImportError as exc:
    raise extras.MissingExtra("torchtitan", [exc.name or "torchtitan"], __name__) from exc

from deto.comm import CommStats
from deto.integrations._compat import check_world
from deto.optim import DecoupledOptimizer
from deto.sharding import shard
from deto.topology import Topology

logger = logging.getLogger(__name__)

TORCHTITAN_VERSIONS = (Version("0.3"), Version("0.4"))
"""The torchtitan releases this module supports: at least the first, below the second (its
configuration classes change between minor releases)."""


def check_torchtitan() -> None:
    """Raise ``RuntimeError`` unless the installed torchtitan is one this module supports."""
    low, high = TORCHTITAN_VERSIONS
    found = Version(torchtitan.__version__)
    if not low <= found < high:
        raise RuntimeError(
            f"deto.integrations.torchtitan supports torchtitan >={low},<{high}, found {found}: "
            f"pip install 'torchtitan>={low},<{high}'"
        )


# -- the model: sharded inside the node --------------------------------------------------------
def parallelism(topology: Topology) -> ParallelismConfig:
    """torchtitan's parallelism for ``topology``: data parallel over every rank, which makes its
    data loader give every rank its own batches and its meshes match deto's (rank = node x ranks
    per node + local rank). Only the degrees are used: :func:`deto_parallelize` shards."""
    return ParallelismConfig(
        data_parallel_replicate_degree=topology.nodes,
        data_parallel_shard_degree=topology.ranks_per_node,
    )


def check_parallel_dims(dims: ParallelDims, topology: Topology, device_type: str) -> None:
    """``ValueError`` (one line) unless torchtitan's world and data-parallel layout are the
    topology's: torchtitan hands batches out by its degrees, so other degrees would feed ranks
    the wrong share of the data."""
    check_world(
        "deto: torchtitan", dims.world_size, dist.get_rank(), device_type, topology,
        "launch with torchrun and pass parallelism=deto.integrations.torchtitan."
        "parallelism(topology)",
    )  # fmt: skip
    seen = (dims.dp_replicate, dims.dp_shard, dims.tp, dims.cp, dims.pp, dims.ep)
    wanted = (topology.nodes, topology.ranks_per_node, 1, 1, 1, 1)
    if seen != wanted:
        raise ValueError(
            "deto: torchtitan's parallelism is (replicate, shard, tp, cp, pp, ep) = "
            f"{seen}, the Topology needs {wanted}: pass parallelism=deto.integrations."
            "torchtitan.parallelism(topology) (no tensor, context, pipeline or expert parallelism)"
        )


def deto_parallelize(
    topology: Topology, *, mixed_precision: str | None = None, device_type: str | None = None
) -> Callable[..., nn.Module]:
    """A model spec's ``parallelize_fn``: FSDP2 over each node's ranks (``deto.shard``).

    torchtitan calls it on the model it built on the meta device, then materialises and
    initialises the shards itself. ``device_type`` is the device torchtitan trains on (by
    default its own choice), checked against the topology's.
    """

    def parallelize(model: nn.Module, *, parallel_dims: ParallelDims, **_: Any) -> nn.Module:
        check_parallel_dims(parallel_dims, topology, device_type or titan_utils.device_type)
        shard(model, topology, mixed_precision=mixed_precision)
        # torchtitan divides each rank's summed loss by the tokens of every rank, and FSDP2
        # would then average inside the node: summing and scaling by the node count instead
        # gives every node the gradient of the mean loss, which the replicators then average.
        # (Sum-only reductions, with the factor applied separately: gloo has no PREMUL_SUM.)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0 / topology.nodes)
                module.set_force_sum_reduction_for_comms(True)
        return model

    return parallelize


def deto_model_spec(
    spec: ModelSpec, topology: Topology, *, mixed_precision: str | None = None
) -> ModelSpec:
    """``spec`` (e.g. ``torchtitan.models.llama3.model_registry("8B")``) sharded by deto."""
    return dataclasses.replace(
        spec,
        parallelize_fn=deto_parallelize(topology, mixed_precision=mixed_precision),
        pipelining_fn=None,
    )


# -- the optimizers: torchtitan's, wrapped ------------------------------------------------------
class DetoOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` whose optimizers are :class:`DecoupledOptimizer`.

    torchtitan builds its optimizers from ``param_groups`` as usual (AdamW, fused or not, its
    per-pattern groups); each is wrapped with the ``replicator``. Its LR schedulers drive the
    wrapped optimizers (they share the parameter groups), and its checkpointer saves
    :meth:`state_dict`: torchtitan's flat layout of each optimizer's state, replicator buffers
    (one per node) and step counters included. One optimizer per model part is supported.
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        topology: Topology | None = None
        """The cluster shape; ``None`` reads torchrun's (``Topology.from_env()``)."""

        replicator: str = "demo"
        """A replicator's registry name (``"demo"``, ``"full"``, ...)."""

        replicator_options: dict[str, Any] = dataclasses.field(default_factory=dict)
        sign: bool = False
        """Use the sign of the replicated gradient (FlexDeMo's sign-SGD); off for AdamW."""

        nonfinite: str = "raise"
        """What to do with non-finite gradients (see ``deto.DecoupledOptimizer``)."""

    optimizers: list[DecoupledOptimizer]  # type: ignore[assignment]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        if len(self.optimizers) != len(model_parts):
            raise ValueError(
                f"DetoOptimizersContainer: {len(self.optimizers)} optimizers for "
                f"{len(model_parts)} model part(s); use one optimizer type for all parameters"
            )
        topology = config.topology if config.topology is not None else Topology.from_env()
        self.optimizers = [
            DecoupledOptimizer.from_model(
                part,
                topology,
                base,
                replicator=config.replicator,
                sign=config.sign,
                nonfinite=config.nonfinite,
                **config.replicator_options,
            )
            for part, base in zip(model_parts, self.optimizers, strict=True)
        ]

    def stats(self) -> CommStats:
        """The inter-node traffic of the last step, summed over the optimizers."""
        total = CommStats()
        for opt in self.optimizers:
            total += opt.stats()
        return total

    def state_dict(self) -> dict[str, Any]:
        # torchtitan's container first runs a zero step through each optimizer to create its
        # state; through a DecoupledOptimizer that step would exchange and count as a step.
        # deto's state_dict creates the base optimizer's state without one.
        out: dict[str, Any] = {}
        for opt in self.optimizers:
            out.update(get_flat_optim_state_dict(opt))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for opt in self.optimizers:
            opt.state_dict()  # the state the flat layout is read into (see state_dict)
            load_flat_optim_state_dict(opt, state_dict)


# -- what a CPU run needs ------------------------------------------------------------------------
class DenseFlexAttention(FlexAttention):
    """torchtitan's FlexAttention with its masks computed densely by SDPA.

    FlexAttention has no backward on CPU and torchtitan's language models accept no other
    backend there (plain SDPA is refused, varlen needs flash attention). This one takes the
    same ``BlockMask`` the model builds (causal, per document), expands its ``mask_mod`` to a
    boolean mask and runs ``scaled_dot_product_attention``, which trains anywhere.
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(FlexAttention.Config):
        pass

    def forward(  # type: ignore[override]
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: BlockMask,
        scale: float | None = None,
        enable_gqa: bool = False,
        **_: Any,
    ) -> torch.Tensor:
        batch, length = q_BLNH.shape[:2]
        mask = create_mask(
            attention_masks.mask_mod, batch, None, length, k_BLNH.shape[1], device=q_BLNH.device
        )
        out = F.scaled_dot_product_attention(
            q_BLNH.transpose(1, 2),
            k_BLNH.transpose(1, 2),
            v_BLNH.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        return out.transpose(1, 2)


def dense_attention(model_config: Any) -> Any:
    """``model_config`` with every FlexAttention replaced by :class:`DenseFlexAttention`."""
    for _, _, parent, attr in list(model_config.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = DenseFlexAttention.Config()
        else:
            setattr(parent, attr, DenseFlexAttention.Config())
    return model_config


class ByteTokenizer(BaseTokenizer):
    """Bytes as tokens (0-255): no tokenizer files to read or download."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, **_: Any) -> None:  # tokenizer_path unused
        super().__init__()

    def encode(self, text: str, *_: Any, **__: Any) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], *_: Any, **__: Any) -> str:
        return bytes(ids).decode(errors="replace")

    def get_vocab_size(self) -> int:
        return 256


class RandomTokens(BaseDataLoader):
    """Synthetic batches of byte tokens, drawn from (seed, step, rank): no data set to download.

    Every data-parallel rank draws its own batches, and the state a checkpoint keeps is the
    step count, so a resumed run reads what a straight run reads. The tokens are uniform over
    0-255: the loss falls from ``log(vocab_size)`` towards ``log(256)`` as the model learns
    which tokens occur. Yields torchtitan's ``({"input", "positions"}, labels)``.
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        seed: int = 0

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        seq_len: int,
        local_batch_size: int,
        **_: Any,  # tokenizer, snapshot_every_n_steps: nothing to tokenize, the state is tiny
    ) -> None:
        self.seed, self.rank, self.world = config.seed, dp_rank, dp_world_size
        self.seq_len, self.batch_size = seq_len, local_batch_size
        self.step = 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        positions = torch.arange(self.seq_len).expand(self.batch_size, -1)
        while True:
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.step) * 65_537 + self.rank
            )
            tokens = torch.randint(0, 256, (self.batch_size, self.seq_len + 1), generator=gen)
            self.step += 1
            yield {"input": tokens[:, :-1], "positions": positions}, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        # one key per rank (as torchtitan's own loaders), so DCP keeps every rank's
        return {f"dp_rank_{self.rank}": self.step, "world_size": self.world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("world_size", self.world) != self.world:
            raise ValueError(
                f"RandomTokens: the checkpoint has {state_dict['world_size']} data-parallel "
                f"ranks, this run {self.world}"
            )
        self.step = int(state_dict.get(f"dp_rank_{self.rank}", self.step))


# -- the check: torchtitan's Llama debug model on 2 simulated nodes ----------------------------
@contextmanager
def _without_warning(message: str, module: str) -> Iterator[None]:
    """Inside the block, drop the ``UserWarning`` matching ``message`` that ``module`` (the
    module the warning names as its place) gives; each use says why it is harmless there.
    Without it every rank prints the same third-party line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                module=rf"{module}\Z")  # fmt: skip
        yield


CHECK_SEQ_LEN = 64
CHECK_BATCH = 2
CHECK_LR = 1e-3


class _TrainState:
    """The step counter torchtitan's checkpointer keeps (its Trainer keeps itself there)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _document_masks(positions: torch.Tensor) -> BlockMask:
    """torchtitan's causal, per-document mask, built without compiling (50 s per CPU process)."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask
    from torchtitan.models.common.attention import get_causal_mask_mod, get_document_mask_mod

    mask_mod = and_masks(get_causal_mask_mod(), get_document_mask_mod(positions))
    batch, length = positions.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=positions.device)


def train_debug_model(
    folder: str,
    steps: int,
    topology: Topology,
    *,
    checkpoint_every: int,
    resume: bool = False,
    replicator: str = "demo",
) -> dict[str, Any]:
    """Train torchtitan's Llama 3 debug model on this rank for ``steps`` steps, the way its
    ``Trainer.train_step`` does, with torchtitan's components built from their configs: the
    deto model spec, :class:`DetoOptimizersContainer`, its LR schedulers, its loss, its gradient
    clipping and its DCP ``CheckpointManager`` (saving every ``checkpoint_every`` steps under
    ``folder``; ``resume`` loads the latest). Only the attention (:class:`DenseFlexAttention`)
    and the data (:class:`RandomTokens`) are deto's, so that it runs on CPU.

    Runs under torchrun or in an initialised process group of ``topology``'s shape. Returns
    the step, the losses, this node's inter-node bytes per step, and the model and optimizer
    for checks.
    """
    from torchtitan.components.checkpointer import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.llama3 import model_registry

    check_torchtitan()
    topology.init()  # the process group, under torchrun, before torchtitan's parts read ranks
    spec = model_registry("debugmodel")
    parallelize = deto_parallelize(topology, device_type=topology.device_type)
    dims = ParallelDims.from_config(parallelism(topology), topology.world_size)
    model_config = dense_attention(spec.model)
    with torch.device("meta"):
        model = model_config.build()
    model = parallelize(model, parallel_dims=dims)
    model.to_empty(device=topology.torch_device)
    torch.manual_seed(0)  # torchtitan seeds every rank alike before it initialises
    # On a CPU mesh DTensor's random ops draw each shard from the rank's own generator (no
    # offset-based tracker), and say so on every rank. That is what this init relies on: every
    # rank seeded alike, so rank i of every node draws the same shard and the replicas start
    # identical (the tests check it). On CUDA the tracker is used and nothing is said.
    quiet = _without_warning(
        "DTensor random operators may not have complete support on cpu device mesh",
        r"torch\.distributed\.tensor\._dispatch",
    )
    with torch.no_grad(), quiet:
        model.init_weights(buffer_device=None)  # type: ignore[operator]  # a BaseModel method
    model.train()

    optimizer_config = DetoOptimizersContainer.Config(
        param_groups=default_adamw(lr=CHECK_LR).param_groups,
        implementation="for-loop",
        topology=topology,
        replicator=replicator,
    )
    optimizers = optimizer_config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=steps
    )
    loader = RandomTokens.Config().build(
        dp_world_size=topology.world_size, dp_rank=topology.rank,
        seq_len=CHECK_SEQ_LEN, local_batch_size=CHECK_BATCH,
    )  # fmt: skip
    state = _TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True, folder="checkpoint", interval=checkpoint_every, last_save_model_only=False,
        initial_load_model_only=False,  # its default True warns on every rank without a path
    ).build(
        dataloader=loader, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": state}, sd_adapter=None, base_folder=folder,
    )  # fmt: skip
    loss_fn = CrossEntropyLoss.Config().build()
    if resume:
        # torchtitan's LRSchedulersContainer.load_state_dict recomputes each scheduler's last
        # LR with get_lr() outside a step, which torch warns about on every rank; the value is
        # right (torchtitan's schedules are pure functions of the restored step).
        with _without_warning(
            "To get the last learning rate computed by the scheduler",
            r"torch\.optim\.lr_scheduler",
        ):
            loaded = checkpointer.load()
        if not loaded:
            raise FileNotFoundError(f"No torchtitan checkpoint under {folder}")

    losses, node_bytes = [], []
    batches = iter(loader)
    while state.step < steps:
        state.step += 1
        optimizers.zero_grad()
        inputs, labels = next(batches)
        tokens = torch.tensor(labels.numel(), dtype=torch.float32)
        dist.all_reduce(tokens)  # torchtitan normalises by the tokens of every rank
        pred = model(
            inputs["input"],
            positions=inputs["positions"],
            attention_masks=_document_masks(inputs["positions"]),
        )
        loss, _ = loss_fn(pred, labels, tokens)
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizers.step()
        schedulers.step()
        losses.append(float(loss.detach()) * topology.world_size)
        node_bytes.append(optimizers.stats().node_bytes_sent)
        checkpointer.save(state.step, last_step=state.step == steps)
    checkpointer.close()
    return {"step": state.step, "losses": losses, "node_bytes": node_bytes,
            "model": model, "optimizer": optimizers.optimizers[0]}  # fmt: skip


def _digest(tensors: list[torch.Tensor]) -> str:
    import hashlib

    from deto.replicators.base import local_tensor

    h = hashlib.sha256()
    for t in tensors:
        h.update(local_tensor(t).detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_rank(rank: int, topology: Topology, folder: str, steps: int, results: Any) -> None:
    """One rank of :func:`run_torchtitan_check`: a straight run, then one resumed halfway."""
    import datetime
    import os
    import shutil

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(topology.world_size))
    dist.init_process_group(
        topology.backend, init_method=f"file://{folder}/rendezvous", rank=rank,
        world_size=topology.world_size, timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        runs = {}
        for name, resume in (("straight", False), ("resumed", True)):
            if resume and rank == 0:
                shutil.copytree(
                    f"{folder}/straight/checkpoint/step-{steps // 2}",
                    f"{folder}/resumed/checkpoint/step-{steps // 2}",
                )
            dist.barrier()
            out = train_debug_model(
                f"{folder}/{name}", steps, topology, checkpoint_every=steps // 2, resume=resume
            )
            params = [p for _, p in sorted(out["model"].named_parameters())]
            opt_state = [t for s in out["optimizer"].state.values() for t in s.values()
                         if isinstance(t, torch.Tensor)]  # fmt: skip
            runs[name] = (_digest(params), _digest(opt_state), out["losses"], out["node_bytes"])
        gathered: list[Any] = [None] * topology.world_size
        dist.all_gather_object(gathered, runs)
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def run_torchtitan_check(
    device: str, *, nodes: int = 2, ranks_per_node: int | None = None, steps: int = 4
) -> dict[str, Any]:
    """Train torchtitan's Llama 3 debug model on ``nodes`` simulated nodes on this machine
    (``device`` ``"cpu"``: gloo, 2 ranks per node; ``"cuda"``: NCCL, one GPU per rank, the
    GPUs split evenly over the nodes), checkpoint it halfway with torchtitan's checkpointer,
    resume, and report: for the GPU self-check, which has no test suite of its own.

    The run is :func:`train_debug_model` (torchtitan's components, a loop like its
    ``Trainer.train_step``), on fresh processes. Returns ``replicas_identical`` (every node's
    shards bitwise equal after the run), ``resume_bitwise`` (the resumed run's parameters,
    optimizer state and losses equal the straight run's), ``inter_node_bytes_per_step`` (node
    0's, every step) and ``losses`` (rank 0's). Raises ``RuntimeError`` where the machine has
    too few GPUs (NCCL cannot put two ranks on one GPU).
    """
    import tempfile

    import torch.multiprocessing as mp

    if device == "cuda":
        gpus = torch.cuda.device_count()
        per_node = ranks_per_node or gpus // nodes
        if per_node < 1 or nodes * per_node > gpus:
            raise RuntimeError(
                f"run_torchtitan_check: {nodes} node(s) x {max(per_node, 1)} rank(s) need as "
                f"many GPUs, found {gpus}"
            )
    else:
        per_node = ranks_per_node or 2
    topology = Topology(nodes=nodes, ranks_per_node=per_node, device=device)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            ctx.Process(target=_check_rank, args=(r, topology, folder, steps, results))
            for r in range(topology.world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"run_torchtitan_check: a rank failed (exit codes {codes})")
        ranks = results.get(timeout=10)
    local = [r["straight"][0] for r in ranks]
    return {
        "device": device,
        "shape": f"{nodes}x{per_node}",
        "replicas_identical": all(
            local[i] == local[i % per_node] for i in range(topology.world_size)
        ),
        "resume_bitwise": all(
            r["resumed"][:2] == r["straight"][:2]
            and r["resumed"][2] == r["straight"][2][steps // 2 :]
            for r in ranks
        ),
        "inter_node_bytes_per_step": ranks[0]["straight"][3],
        "losses": ranks[0]["straight"][2],
    }
