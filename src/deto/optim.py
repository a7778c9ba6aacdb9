"""DecoupledOptimizer: any torch optimizer, with replicators deciding what crosses nodes.

One step: (1) each covered gradient goes to the first gradient replicator that covers it and
fires on this step (or, when none fires, is folded into the first one's state and the parameter
rests); (2) optional sign; (3) decoupled weight decay; (4) the base optimizer steps;
(5) parameter replicators (DiLoCo) act. The class shares the base optimizer's ``param_groups``
so LR schedulers, gradient clipping and ``zero_grad`` behave as with the base optimizer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from deto._validate import check_choice, check_float
from deto.comm import Comm, CommStats
from deto.replicators.base import Replicator, Slot, local_tensor

logger = logging.getLogger(__name__)

NONFINITE_MODES = ("raise", "skip", "ignore")


class DecoupledOptimizer(torch.optim.Optimizer):
    """Wrap ``base`` so the replicators own all inter-node communication.

    Args:
        base: any ``torch.optim.Optimizer`` over the (sharded) parameters.
        replicators: applied in order; see the module docstring for how they combine.
        comm: collectives over the replicate group.
        sign: replace every gradient by its sign before the base step (sign-SGD).
        weight_decay: decoupled weight decay ``p <- p * (1 - lr * wd)`` before the base step.
        param_names: names for parameters (replicator ``include`` filters and checkpoints).
        nonfinite: ``"raise"`` a ``FloatingPointError`` on a non-finite local gradient,
            ``"skip"`` (this rank contributes zeros for that tensor, and counts it), or
            ``"ignore"`` (no check, no host sync).
        node_group: the ``shard`` group, used to add up the node's traffic in :meth:`stats`.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        replicators: Sequence[Replicator],
        comm: Comm,
        *,
        sign: bool = False,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
        nonfinite: str = "raise",
        node_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if not isinstance(sign, bool):
            raise TypeError(f"sign must be a bool, got {type(sign).__name__}")
        for r in replicators:
            if not isinstance(r, Replicator):
                raise TypeError(f"replicators must be Replicator instances, got {type(r).__name__}")
        self.base = base
        self.defaults = base.defaults
        self.replicators = list(replicators)
        self.comm = comm
        self.sign = sign
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0, float("inf"))
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        self.node_group = node_group
        self.step_count = 0
        self._last = CommStats()
        self._node_totals: torch.Tensor | None = None
        self._node_work: Any = None
        # attributes torch.optim.Optimizer's machinery (hooks, LR schedulers) expects
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

        self.params = [p for g in base.param_groups for p in g["params"]]
        self._group_of = [gi for gi, g in enumerate(base.param_groups) for _ in g["params"]]
        names = dict(param_names or {})
        self.names = [names.get(p, f"param{i}") for i, p in enumerate(self.params)]
        # for every parameter: the (replicator, position) pairs of gradient replicators covering it
        self._grad_owners: list[list[tuple[Replicator, int]]] = [[] for _ in self.params]
        for rep in self.replicators:
            slots = [
                Slot(i, n, p)
                for i, (n, p) in enumerate(zip(self.names, self.params, strict=True))
                if rep.covers(n, p)
            ]
            rep.bind(slots)
            if rep.acts_on == "grad":
                for pos, slot in enumerate(slots):
                    self._grad_owners[slot.index].append((rep, pos))

    # torch.optim.Optimizer compatibility: share the base optimizer's groups and state.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, state: Any) -> None:
        self.base.state = state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("Add parameter groups to the model before deto.prepare()")

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
        skipped = self._check_finite(grads)

        fires = {id(r): r.schedule.fires(t) for r in self.replicators}
        fired: dict[int, tuple[Replicator, list[int], list[int]]] = {}
        deferred: dict[int, tuple[Replicator, list[int], list[int]]] = {}
        for i in present:
            owners = self._grad_owners[i]
            if not owners:
                continue  # no gradient replicator covers it: the node's own gradient is used
            rep, pos = next(((r, q) for r, q in owners if fires[id(r)]), owners[0])
            bucket = fired if fires[id(rep)] else deferred
            entry = bucket.setdefault(id(rep), (rep, [], []))
            entry[1].append(i)
            entry[2].append(pos)

        lrs = [g["lr"] for g in self.base.param_groups]
        for rep, indices, positions in deferred.values():
            rep.defer(positions, [grads[i] for i in indices], [lrs[self._group_of[i]] for i in indices])
            for i in indices:
                self.params[i].grad = None
        for rep in self.replicators:  # in order, so the collectives line up on every node
            if id(rep) not in fired:
                continue
            _, indices, positions = fired[id(rep)]
            new = rep.replicate(
                positions, [grads[i] for i in indices], [lrs[self._group_of[i]] for i in indices], self.comm
            )
            for i, g in zip(indices, new, strict=True):
                grads[i].copy_(g)

        for i in present:
            p = self.params[i]
            if p.grad is None:
                continue
            if self.sign:
                grads[i].sign_()
            if self.weight_decay:
                lr = lrs[self._group_of[i]]
                local_tensor(p).mul_(1.0 - lr * self.weight_decay)
        self.base.step()
        for rep in self.replicators:
            if rep.acts_on == "param" and fires[id(rep)]:
                rep.after_step(self.comm)
        self._finish_stats(skipped)
        return loss

    def _check_finite(self, grads: dict[int, torch.Tensor]) -> int:
        if self.nonfinite == "ignore" or not grads:
            return 0
        # one norm per tensor (fused on CUDA) and one host sync: inf/nan anywhere shows in the norm
        finite = torch.stack(torch._foreach_norm(list(grads.values()))).isfinite().cpu()
        if bool(finite.all()):
            return 0
        bad = [self.names[i] for i, ok in zip(grads, finite.tolist(), strict=True) if not ok]
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite gradient at step {self.step_count} in {len(bad)} tensor(s): "
                f"{', '.join(bad[:5])} (pass nonfinite='skip' to drop them instead)"
            )
        logger.warning("step %d: skipping non-finite gradients of %s", self.step_count, ", ".join(bad[:5]))
        for i, ok in zip(list(grads), finite.tolist(), strict=True):
            if not ok:
                grads[i].zero_()
        return len(bad)

    def _finish_stats(self, skipped: int) -> None:
        stats = self.comm.take_stats()
        stats.nonfinite_skipped = skipped
        self._last = stats
        if self.node_group is not None and dist.get_world_size(self.node_group) > 1:
            device = self.params[0].device if self.params else torch.device("cpu")
            totals = torch.tensor([stats.bytes_sent, stats.bytes_received], dtype=torch.int64, device=device)
            self._node_work = dist.all_reduce(totals, group=self.node_group, async_op=True)
            self._node_totals = totals
        else:
            stats.node_bytes_sent, stats.node_bytes_received = stats.bytes_sent, stats.bytes_received

    def stats(self) -> CommStats:
        """Inter-node traffic of the last step (this rank's, and the node's total)."""
        if self._node_work is not None:
            self._node_work.wait()
            assert self._node_totals is not None
            self._last.node_bytes_sent, self._last.node_bytes_received = self._node_totals.tolist()
            self._node_work = None
        return self._last

    @property
    def promises_identical_replicas(self) -> bool:
        """Whether the replicas are bitwise identical across nodes after the last step: every
        replicator promises it, and every parameter replicator (DiLoCo) synchronised on it."""
        return all(r.promises_identical_replicas for r in self.replicators) and all(
            r.schedule.fires(self.step_count) for r in self.replicators if r.acts_on == "param"
        )

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Base optimizer state, every replicator's state (buffers, counters) and the step."""
        return {
            "base": self.base.state_dict(),
            "step": self.step_count,
            "replicators": [r.state_dict() for r in self.replicators],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict["replicators"]
        if len(saved) != len(self.replicators):
            raise ValueError(
                f"Checkpoint has {len(saved)} replicator(s), this optimizer {len(self.replicators)}"
            )
        self.base.load_state_dict(state_dict["base"])
        for rep, st in zip(self.replicators, saved, strict=True):
            rep.load_state_dict(st)
        self.step_count = int(state_dict["step"])
