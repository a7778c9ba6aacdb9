"""DecoupledOptimizer: any torch optimizer, with replicators deciding what crosses nodes.

One step: (1) each gradient is routed (:mod:`deto.routing`): replicated by the first gradient
replicator that covers it and fires, folded into a replicator's state when none fires, or kept
as the node's own; (2) the gradients the base optimizer will use are checked for non-finite
values; (3) optional sign; (4) decoupled weight decay; (5) the base optimizer steps;
(6) parameter replicators (DiLoCo) act. The class is a ``torch.optim.Optimizer`` sharing the
base optimizer's ``param_groups``, so step hooks, LR schedulers, ``swa_utils``, gradient
clipping and ``zero_grad`` behave as with the base optimizer, and its state dict is torch's
format (see :mod:`deto.optim_state`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from deto._validate import check_choice, check_float
from deto.buffers import BufferSync, synced_buffers
from deto.comm import Comm, CommStats
from deto.optim_state import (
    STEP_KEY,
    from_saved,
    init_base_state,
    is_deto_key,
    per_node,
    replicator_key,
)
from deto.ranklog import warn, warn_once
from deto.replicators.base import (
    GradReplicator,
    ParamReplicator,
    Replicator,
    ReplicatorSpec,
    Slot,
    build_replicators,
    local_tensor,
)
from deto.replicators.full import NoReplication
from deto.routing import owner, route
from deto.topology import Topology

logger = logging.getLogger(__name__)

NONFINITE_MODES = ("raise", "skip", "ignore")
SINGLE_NODE_WARNING = (
    "1 node: nothing crosses nodes; set DETO_NODES or launch with --nnodes "
    "(deto train: --nodes) to replicate across nodes"
)
OptimizerSpec = type[torch.optim.Optimizer] | torch.optim.Optimizer


class DecoupledOptimizer(torch.optim.Optimizer):
    """Wrap ``base`` so the replicators own all inter-node communication.

    Most code builds one with :meth:`from_model` (or :func:`deto.prepare`); the constructor is
    the seam for tests and custom set-ups (for instance :class:`deto.testing.FakeComm`).

    Args:
        base: any ``torch.optim.Optimizer`` over the (sharded) parameters.
        replicators: :class:`GradReplicator` and :class:`ParamReplicator` instances, applied in
            order; see the module docstring for how they combine.
        comm: collectives over the replicate group.
        mesh: the 2-D ``(replicate, shard)`` device mesh the parameters are sharded on (its
            first dimension spans the nodes, the second one node's ranks). It lets checkpoints
            keep every node's replicator state and :meth:`stats` add up the node's traffic;
            ``None`` when each node is one process with unsharded parameters.
        sign: replace every gradient by its sign before the base step (sign-SGD).
        weight_decay: decoupled weight decay ``p <- p * (1 - lr * wd)`` before the base step.
        param_names: names for parameters (replicator ``include`` filters and messages).
        nonfinite: what to do when a gradient the base optimizer would use is not finite:
            ``"raise"`` a ``FloatingPointError``, ``"skip"`` it (its parameter gets a zero
            gradient, and it is counted), or ``"ignore"`` (no check, no host sync). The check
            runs after the exchange, where every node holds the same gradient, so every node
            raises or skips alike.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        replicators: Sequence[Replicator],
        comm: Comm,
        *,
        mesh: DeviceMesh | None = None,
        sign: bool = False,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if not isinstance(sign, bool):
            raise TypeError(f"sign must be a bool, got {type(sign).__name__}")
        for given in replicators:
            if not isinstance(given, (GradReplicator, ParamReplicator)):
                raise TypeError(
                    "replicators must be GradReplicator or ParamReplicator instances, "
                    f"got {type(given).__name__}"
                )
        if mesh is not None and mesh.ndim != 2:
            raise ValueError(f"mesh must be the 2-D (replicate, shard) mesh, got {mesh.ndim}-D")
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0, float("inf"))
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        self.base = base
        # torch's constructor installs the step hooks and every attribute its machinery
        # (schedulers, swa_utils, DCP) relies on; our groups are the base's group dicts.
        super().__init__(base.param_groups, base.defaults)
        self._groups_fixed = True
        self.param_groups = base.param_groups
        self.state = _MergedState(self)  # type: ignore[assignment]
        self.replicators = list(replicators)
        self.comm = comm
        self.mesh = mesh
        self.sign = sign
        self.step_count = 0
        self._last = CommStats()
        self._node_totals: torch.Tensor | None = None
        self._node_work: Any = None
        self._node_group = mesh.get_group(1) if mesh is not None and mesh.size(1) > 1 else None

        self.params = [p for g in base.param_groups for p in g["params"]]
        self._index_of = {id(p): i for i, p in enumerate(self.params)}
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self._group_of = [gi for gi, g in enumerate(base.param_groups) for _ in g["params"]]
        names = dict(param_names or {})
        self.names = [names.get(p, f"param{i}") for i, p in enumerate(self.params)]
        # per parameter: the positions of the gradient replicators covering it, in list order;
        # per replicator: which slot holds each parameter it covers
        self._coverage: list[list[int]] = [[] for _ in self.params]
        self._slot_of: list[dict[int, int]] = []
        for r, rep in enumerate(self.replicators):
            slots = [
                Slot(i, n, p)
                for i, (n, p) in enumerate(zip(self.names, self.params, strict=True))
                if rep.covers(n, p)
            ]
            rep.bind(slots)
            self._slot_of.append({s.index: pos for pos, s in enumerate(slots)})
            if isinstance(rep, GradReplicator):
                for slot in slots:
                    self._coverage[slot.index].append(r)
        self._param_replicators = [r for r in self.replicators if isinstance(r, ParamReplicator)]
        self._grad_replicators = [r for r in self.replicators if isinstance(r, GradReplicator)]
        self._early_hooks = self._install_early_start()
        self._publish_scalars()

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        topology: Topology,
        optimizer: OptimizerSpec = torch.optim.SGD,
        *,
        replicator: ReplicatorSpec = "demo",
        lr: float = 1e-3,
        sign: bool = True,
        weight_decay: float = 0.0,
        nonfinite: str = "raise",
        optimizer_options: dict[str, Any] | None = None,
        sync_initial: bool = True,
        **replicator_options: Any,
    ) -> DecoupledOptimizer:
        """The optimizer of a model already sharded over the node's mesh.

        ``model`` must be sharded with FSDP2's ``fully_shard`` over ``topology.mesh["shard"]``
        (by :func:`deto.shard`, by hand, or by a framework), or, with one rank per node, may be
        left unsharded. Nothing crosses nodes except through the replicators: do not wrap the
        model in ``DistributedDataParallel``.

        Args:
            optimizer: the base optimizer class (built on ``model.parameters()`` with ``lr``
                and ``optimizer_options``) or a fresh instance over the model's parameters.
            replicator: a registry name (``"demo"``, ``"full"``, ...), a replicator, or a list
                of them; ``**replicator_options`` configure one given by name.
            lr: the base optimizer's learning rate (DeMo also scales its momentum by it).
            sign: use the sign of the replicated gradient (sign-SGD; FlexDeMo's default).
            weight_decay: decoupled weight decay, applied by deto for every base optimizer.
            nonfinite: see the class docstring.
            sync_initial: broadcast node 0's parameters and buffers to every node, so replicas
                start equal. Floating buffers (BatchNorm statistics) are averaged over every
                rank on each step that syncs the parameters (:class:`deto.buffers.BufferSync`).
        """
        check_model_args(model, topology, lr)
        replicators = build_replicators(replicator, replicator_options)
        mesh = topology.init()
        if topology.nodes == 1 and any(not isinstance(r, NoReplication) for r in replicators):
            warn_once(logger, SINGLE_NODE_WARNING)
        _check_sharded(model, mesh)
        base = build_base(optimizer, model, lr, optimizer_options or {})
        comm = Comm(mesh["replicate"].get_group(), topology.nodes)
        buffers = synced_buffers(model)
        if sync_initial:
            with torch.no_grad():
                comm.broadcast([local_tensor(p) for p in model.parameters()] + buffers, src=0)
            comm.take_stats()  # set-up traffic is not a step's traffic
        opt = cls(
            base,
            replicators,
            comm,
            mesh=mesh,
            sign=sign,
            weight_decay=weight_decay,
            param_names={p: n for n, p in model.named_parameters()},
            nonfinite=nonfinite,
        )
        opt.register_step_pre_hook(BufferSync(buffers, comm, mesh["shard"].get_group()))
        logger.info(
            "deto: %s on %d node(s) x %d rank(s)", opt, topology.nodes, topology.ranks_per_node
        )
        return opt

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_groups_fixed", False):
            raise NotImplementedError(
                "Add parameter groups to the base optimizer before wrapping it"
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @property
    def node_group(self) -> dist.ProcessGroup | None:
        """The ``shard`` group (this node's ranks), or ``None`` with one rank per node."""
        return self._node_group

    @property
    def promises_identical_replicas(self) -> bool:
        """Whether the replicas are bitwise identical across nodes after the last step."""
        return all(r.promises_identical_replicas for r in self.replicators) and all(
            self.step_count == 0 or r.schedule.fires(self.step_count)
            for r in self._param_replicators
        )

    def __repr__(self) -> str:
        reps = ", ".join(map(repr, self.replicators)) or "none"
        return (
            f"DecoupledOptimizer(base={type(self.base).__name__}, replicators=[{reps}], "
            f"sign={self.sign}, weight_decay={self.weight_decay})"
        )

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        t = self.step_count
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = {i: local_tensor(self.params[i].grad) for i in present}
        routes = route(self._coverage, [r.schedule.fires(t) for r in self.replicators], present)
        lrs = [self.param_groups[self._group_of[i]]["lr"] for i in range(len(self.params))]

        for r, indices in routes.deferred.items():
            positions = [self._slot_of[r][i] for i in indices]
            self._grad_replicator(r).defer(
                positions, [grads.pop(i) for i in indices], [lrs[i] for i in indices]
            )
            for i in indices:
                self.params[i].grad = None
        for r in sorted(routes.fired):  # in list order, so the collectives line up on every node
            indices = routes.fired[r]
            positions = [self._slot_of[r][i] for i in indices]
            new = self._grad_replicator(r).replicate(
                positions, [grads[i] for i in indices], [lrs[i] for i in indices], self.comm
            )
            for i, g in zip(indices, new, strict=True):
                grads[i].copy_(g)

        skipped = self._handle_nonfinite(grads)
        agreed = [pair for rep in self._grad_replicators for pair in rep.consensus()]
        for live, consensus in agreed:  # eager overlap: the base steps the consensus
            live.copy_(consensus)
        for i, grad in grads.items():
            if self.sign:
                grad.sign_()
            if self.weight_decay:
                local_tensor(self.params[i]).mul_(1.0 - lrs[i] * self.weight_decay)
        self.base.step()
        if agreed:
            for live, consensus in agreed:
                consensus.copy_(live)
            self._step_provisional()
        for param_rep in self._param_replicators:  # in list order, like the gradient ones
            if param_rep.schedule.fires(t):
                param_rep.after_step(self.comm)
        self._finish_stats(skipped)
        self._publish_scalars()
        return loss

    def _step_provisional(self) -> None:
        """Eager overlap: move each live shard by this node's own estimate of the aggregate in
        flight, as the base optimizer would step it, leaving the base's state as it was.

        The base's state is that of the consensus, which only aggregates advance; this trial
        step reads it and then restores it (a copy of the state of the shards concerned, none
        for SGD without momentum). Gradients of the other parameters are hidden meanwhile.
        """
        estimates = {
            rep.slots[pos].index: estimate
            for rep in self._grad_replicators
            for pos, estimate in rep.provisional().items()
        }
        if not estimates:
            return
        hidden = {i: p.grad for i, p in enumerate(self.params) if i not in estimates}
        kept, lent = {}, []
        for i, estimate in estimates.items():
            param = self.params[i]
            if param.grad is None:  # a step that deferred it: the same update is still in flight
                param.grad = torch.zeros_like(param)
                lent.append(i)
            grad = local_tensor(param.grad)
            grad.copy_(estimate.sign() if self.sign else estimate)
            kept[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in self.base.state.get(param, {}).items()}
        for i in hidden:
            self.params[i].grad = None
        self.base.step()
        for i, state in kept.items():
            self.base.state[self.params[i]] = state
        for i, grad in hidden.items():
            self.params[i].grad = grad
        for i in lent:
            self.params[i].grad = None

    @contextlib.contextmanager
    def consensus(self) -> Iterator[None]:
        """Within the block, every eagerly updated shard holds the parameters all nodes agree
        on (see :meth:`GradReplicator.consensus`): what replica checks, evaluations and the
        final model should read. Outside it, live shards also hold this node's provisional
        update. A no-op for every scheme without eager overlap."""
        agreed = [pair for rep in self._grad_replicators for pair in rep.consensus()]
        live = [t.clone() for t, _ in agreed]
        with torch.no_grad():
            for t, consensus in agreed:
                t.copy_(consensus)
        try:
            yield
        finally:
            with torch.no_grad():
                for (t, _), saved in zip(agreed, live, strict=True):
                    t.copy_(saved)

    def _install_early_start(self) -> list[Any]:
        """Hooks handing each gradient to a replicator that :attr:`~GradReplicator.starts_early`
        as soon as the backward pass has made it (FSDP2 runs a sharded parameter's
        post-accumulate-grad hooks once its unit is reduce-scattered; autograd runs them for
        plain parameters). The hook holds the optimizer weakly, so it outlives it harmlessly."""
        early = {r for r, rep in enumerate(self.replicators) if isinstance(rep, GradReplicator)
                 and rep.starts_early}  # fmt: skip
        if not early:
            return []
        this = weakref.ref(self)

        def grad_ready(param: torch.Tensor) -> None:
            opt = this()
            if opt is not None:
                opt._grad_ready(param)

        return [
            p.register_post_accumulate_grad_hook(grad_ready)
            for i, p in enumerate(self.params)
            if early & set(self._coverage[i])
        ]

    def _grad_ready(self, param: torch.Tensor) -> None:
        """Start the exchange of ``param``'s gradient if its replicator on the coming step starts
        early (the same routing :meth:`step` will do, which depends only on the step)."""
        i = self._index_of[id(param)]
        t = self.step_count + 1
        r = owner(self._coverage[i], [rep.schedule.fires(t) for rep in self.replicators])
        if r is None:
            return
        rep = self._grad_replicator(r)
        if rep.starts_early and param.grad is not None:
            with torch.no_grad():
                rep.start(self._slot_of[r][i], local_tensor(param.grad), self.comm)

    def _grad_replicator(self, position: int) -> GradReplicator:
        rep = self.replicators[position]
        assert isinstance(rep, GradReplicator)  # routing only hands out gradient replicators
        return rep

    def _handle_nonfinite(self, grads: dict[int, torch.Tensor]) -> int:
        """Check the gradients the base will use; raise, or zero the bad ones. Returns the count.

        Replicated gradients are the same bytes on every node, so the replicate peers agree on
        them; with ``"raise"`` the ranks of a node also agree (one tiny all-reduce inside the
        node), so every rank raises at the same point and no collective is left unmatched. A
        gradient no replicator exchanged (one no gradient replicator covers) is checked on its
        own node only.
        """
        if self.nonfinite == "ignore":
            return 0
        # one norm per tensor (fused on CUDA) and one host sync: inf/nan anywhere shows in the norm
        if grads:
            bad_mask = ~torch.stack(torch._foreach_norm(list(grads.values()))).isfinite()
        else:  # every rank of the node still joins the agreement below
            bad_mask = torch.zeros(0, dtype=torch.bool, device=self._device)
        node_bad = bad_mask.any().to(torch.int64).reshape(1)
        if self.nonfinite == "raise" and self._node_group is not None:
            dist.all_reduce(node_bad, op=dist.ReduceOp.MAX, group=self._node_group)
        bad = [i for i, b in zip(grads, bad_mask.tolist(), strict=True) if b]
        if not bad and not int(node_bad):
            return 0
        self._clear_nonfinite_state(bad)
        names = ", ".join(self.names[i] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.nonfinite == "raise":
            self._finish_stats(len(bad))
            where = f"in {len(bad)} tensor(s): {names}" if bad else "on another rank of this node"
            raise FloatingPointError(
                f"Non-finite gradient at step {self.step_count} {where} "
                "(pass nonfinite='skip' to drop them instead)"
            )
        # every node skips the same gradients (the check follows the exchange); each of node
        # 0's ranks names those of its own shard
        warn(logger, "step %d: skipping non-finite gradients of %s", self.step_count, names,
             group=self.comm)
        for i in bad:
            grads[i].zero_()
        return len(bad)

    def _clear_nonfinite_state(self, indices: list[int]) -> None:
        """Zero the non-finite entries a bad gradient left in the replicators' buffers."""
        for r, rep in enumerate(self.replicators):
            for i in indices:
                pos = self._slot_of[r].get(i)
                if pos is not None:
                    for buf in rep.state[pos].values():
                        buf.masked_fill_(~buf.isfinite(), 0.0)

    def _finish_stats(self, skipped: int) -> None:
        stats = self.comm.take_stats()
        stats.nonfinite_skipped = skipped
        self._last = stats
        if self._node_group is not None:
            totals = torch.tensor(
                [stats.bytes_sent, stats.bytes_received], dtype=torch.int64, device=self._device
            )
            self._node_work = dist.all_reduce(totals, group=self._node_group, async_op=True)
            self._node_totals = totals
        else:
            stats.node_bytes_sent = stats.bytes_sent
            stats.node_bytes_received = stats.bytes_received

    def stats(self) -> CommStats:
        """Inter-node traffic of the last step (this rank's, and the node's total)."""
        if self._node_work is not None:
            self._node_work.wait()
            assert self._node_totals is not None
            self._last.node_bytes_sent, self._last.node_bytes_received = self._node_totals.tolist()
            self._node_work = None
        return self._last

    # -- state --------------------------------------------------------------------------------
    def _entries(self, index: int) -> dict[str, torch.Tensor]:
        """The replicators' buffers of parameter ``index``, under their state-dict keys."""
        out = {}
        for r, rep in enumerate(self.replicators):
            pos = self._slot_of[r].get(index)
            if pos is not None:
                for key, buf in rep.state[pos].items():
                    out[replicator_key(r, rep.name, key)] = buf
        return out

    def _scalars(self) -> dict[str, int]:
        out = {STEP_KEY: self.step_count}
        for r, rep in enumerate(self.replicators):
            out.update({replicator_key(r, rep.name, k): v for k, v in rep.scalars().items()})
        return out

    def _publish_scalars(self) -> None:
        """Keep the counters in every param group, where torch's state-dict code carries them.

        DCP's flattened format rebuilds a group from the keys the live group has, so they are
        group entries all the time, not only in :meth:`state_dict`'s result.
        """
        scalars = self._scalars()
        for group in self.param_groups:
            group.update(scalars)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's optimizer format: the base optimizer's state, then the replicators'.

        See :mod:`deto.optim_state` for the layout. Like torch's, tensors are references, not
        copies. Like ``torch.distributed.checkpoint.state_dict``, a fresh optimizer first builds
        its base optimizer's state (one step at learning rate 0), so the result can serve as
        the template of a DCP load.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if self.step_count == 0:
            init_base_state(self.base)
        for rep in self.replicators:
            rep.finish_in_flight()
        self._publish_scalars()
        base_sd = self.base.state_dict()
        state: dict[Any, dict[str, Any]] = {}
        for i, p in enumerate(self.params):
            entry = dict(base_sd["state"].get(i, {}))  # a copy: never add keys to the base's
            entry.update({k: per_node(b, p, self.mesh) for k, b in self._entries(i).items()})
            state[i] = entry
        sd: dict[str, Any] = {"state": state, "param_groups": base_sd["param_groups"]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` (keyed by parameter id, or by name as DCP's functions do)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict["param_groups"]
        saved_scalars = {k: v for k, v in groups[0].items() if is_deto_key(k)} if groups else {}
        scalars = self._scalars()
        if set(saved_scalars) != set(scalars):
            raise ValueError(
                f"Optimizer state has replicator counters {sorted(saved_scalars)}, this "
                f"optimizer {sorted(scalars)} (a different replicator list?)"
            )
        keys = [k for g in groups for k in g["params"]]
        if len(keys) != len(self.params):
            raise ValueError(
                f"Optimizer state covers {len(keys)} parameters, this optimizer {len(self.params)}"
            )
        saved = state_dict["state"]
        base_state = {}
        for k in keys:
            base_entry = {n: v for n, v in saved.get(k, {}).items() if not is_deto_key(n)}
            if base_entry:
                base_state[k] = base_entry
        for i, k in enumerate(keys):
            entry = saved.get(k, {})
            ours = self._entries(i)
            theirs = {n for n in entry if is_deto_key(n)}
            if theirs != set(ours):
                raise ValueError(
                    f"Optimizer state of {self.names[i]} has replicator buffers {sorted(theirs)}, "
                    f"this optimizer {sorted(ours)}"
                )
        self.base.load_state_dict({"state": base_state, "param_groups": groups})
        self.param_groups = self.base.param_groups  # torch's load makes new group dicts
        for i, k in enumerate(keys):
            for n, buf in self._entries(i).items():
                buf.copy_(from_saved(saved[k][n], buf, f"{n} of {self.names[i]}"))
        self.step_count = int(saved_scalars[STEP_KEY])
        for r, rep in enumerate(self.replicators):
            prefix = replicator_key(r, rep.name, "")
            rep.load_scalars(
                {n[len(prefix) :]: v for n, v in saved_scalars.items() if n.startswith(prefix)}
            )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class _MergedState(MutableMapping):  # type: ignore[type-arg]
    """``optimizer.state``: per parameter, the base optimizer's entries and the replicators'.

    Every parameter has an entry (possibly empty), as with a ``defaultdict``. Reading returns a
    new dict whose tensors are the live buffers; assigning a dict routes ``deto.*`` entries
    into the replicators' buffers (copied in place) and the rest to the base optimizer.
    """

    def __init__(self, opt: DecoupledOptimizer) -> None:
        self._opt = opt

    def _index(self, param: torch.Tensor) -> int:
        try:
            return self._opt._index_of[id(param)]
        except KeyError:
            raise KeyError("not a parameter of this optimizer") from None

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        i = self._index(param)
        return {**self._opt.base.state.get(param, {}), **self._opt._entries(i)}

    def __setitem__(self, param: torch.Tensor, value: dict[str, Any]) -> None:
        i = self._index(param)
        ours = self._opt._entries(i)
        for key, v in value.items():
            if is_deto_key(key):
                if key not in ours:
                    raise ValueError(f"{key} is not a buffer of {self._opt.names[i]}")
                ours[key].copy_(from_saved(v, ours[key], key))
        self._opt.base.state[param] = {k: v for k, v in value.items() if not is_deto_key(k)}

    def __delitem__(self, param: torch.Tensor) -> None:
        self._index(param)
        self._opt.base.state.pop(param, None)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._opt.params)

    def __len__(self) -> int:
        return len(self._opt.params)


def check_model_args(model: Any, topology: Any, lr: Any) -> None:
    """The checks shared by :func:`deto.prepare` and :meth:`DecoupledOptimizer.from_model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a deto.Topology, got {type(topology).__name__}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_sharded(model: nn.Module, mesh: DeviceMesh) -> None:
    """Refuse models that would send traffic around the replicators, or are sharded elsewhere."""
    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "model is wrapped in DistributedDataParallel, which all-reduces gradients across "
            "nodes; pass the unwrapped module (deto's replicators replace DDP)"
        )
    node_ranks = mesh.mesh[mesh.get_coordinate()[0]].tolist()  # type: ignore[index]
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            ranks = p.device_mesh.mesh.flatten().tolist()
            if ranks != node_ranks:
                raise ValueError(
                    f"Parameter {name} is sharded over ranks {ranks}, not over this node's "
                    f"ranks {node_ranks} (topology.mesh['shard'])"
                )
        elif len(node_ranks) > 1:
            raise ValueError(
                f"Parameter {name} is not sharded: shard the model over topology.mesh['shard'] "
                "first (deto.shard(model, topology), or fully_shard(..., "
                "mesh=topology.mesh['shard']))"
            )


def build_base(
    optimizer: OptimizerSpec, model: nn.Module, lr: float, options: dict[str, Any]
) -> torch.optim.Optimizer:
    """The base optimizer: a fresh instance over ``model``'s parameters, or one built here."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if options:
            raise ValueError("optimizer_options apply only when optimizer is a class")
        if optimizer.state:
            raise ValueError("Pass a fresh optimizer (this one already has state)")
        ours = {id(p) for p in model.parameters()}
        if any(id(p) not in ours for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("The optimizer holds parameters that are not the model's")
        return optimizer
    if not (inspect.isclass(optimizer) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer class or instance, got {optimizer!r}"
        )
    kwargs = dict(options)
    if "weight_decay" in inspect.signature(optimizer).parameters:
        kwargs.setdefault("weight_decay", 0.0)  # decay is applied, decoupled, by deto
    return optimizer(model.parameters(), lr=lr, **kwargs)  # type: ignore[call-arg]
