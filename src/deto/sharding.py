"""FSDP2 inside a node: which modules become sharding units, and sharding them.

A *unit* is what FSDP2 all-gathers before its forward and frees after, so a model sharded as
one unit (the root) holds all its parameters at once on every rank. The default policy picks
the outermost repeated blocks: the members of every ``nn.ModuleList`` (transformer layers) and
the repeated composite members of every ``nn.Sequential`` (ResNet stages, timm blocks), and
never a module inside one already picked (T5 keeps a ``ModuleList`` inside each of its blocks).
A module that shares a parameter with something outside it (a tied embedding) cannot be a unit
of its own: FSDP2 would shard that parameter twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from deto.topology import Topology

logger = logging.getLogger(__name__)

WrapPolicy = Callable[[nn.Module], bool] | Collection[type[nn.Module]]

MIXED_PRECISION = {
    None: None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}
# BatchNorm's kernels want its parameters in the dtype of its fp32 running statistics: under
# mixed precision each BatchNorm is a unit of its own that computes in fp32 and hands the
# surrounding layers their compute dtype back.
FP32_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def shard(
    model: nn.Module,
    topology: Topology,
    *,
    mixed_precision: str | None = None,
    wrap_policy: WrapPolicy | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over the ranks of each node (the topology's ``shard`` axis).

    Args:
        model: any ``nn.Module``. It is moved to the topology's device, except a model on the
            meta device, which stays there (materialise its shards with
            ``model.to_empty(device=topology.torch_device)`` and your initialisation, or let
            :func:`deto.prepare` call ``reset_parameters()``). A model already sharded with
            ``fully_shard`` over ``topology.mesh["shard"]`` is checked and kept as it is.
        topology: the cluster shape; the process group is initialised if needed.
        mixed_precision: ``None`` or ``"bf16"`` (bf16 compute, fp32 parameters and reductions;
            BatchNorm computes in fp32).
        wrap_policy: which modules become units, besides the root: a collection of module
            classes, or a callable ``(module) -> bool``. Units may nest (inner ones are sharded
            first). ``None``: the outermost repeated blocks (see the module docstring).

    Returns:
        ``model``, sharded in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a deto.Topology, got {type(topology).__name__}")
    mesh = topology.init()["shard"]
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        if mixed_precision is not None or wrap_policy is not None:
            raise ValueError(
                "The model is already sharded: set mixed precision and units in your own "
                "fully_shard calls, not in mixed_precision=/wrap_policy="
            )
        return adopt_sharded(model, mesh)
    if not is_meta(model):
        model.to(topology.torch_device)
    return shard_model(model, mesh, mixed_precision=mixed_precision, wrap_policy=wrap_policy)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: str | None = None,
    wrap_policy: WrapPolicy | None = None,
) -> nn.Module:
    """Apply ``fully_shard`` to every unit (inner ones first), then to the root, over ``mesh``.

    With the 1-D ``shard`` mesh this is FlexDeMo's intra-node sharding (gradients are averaged
    inside the node only); with the 2-D ``(replicate, shard)`` mesh it is torch's own HSDP.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"Invalid mixed_precision: {mixed_precision!r} (expected None or 'bf16')"
        )
    policy = MIXED_PRECISION[mixed_precision] or MixedPrecisionPolicy()
    units = select_units(model, wrap_policy)
    fp32: dict[nn.Module, MixedPrecisionPolicy] = {}
    if mixed_precision is not None:
        fp32_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=policy.param_dtype
        )
        for name, module in model.named_modules():
            if isinstance(module, FP32_MODULES) and _own_parameters(module) and module is not model:
                units.setdefault(name, module)
                fp32[module] = fp32_policy
    by_position = {id(m): i for i, m in enumerate(model.modules())}
    for name, module in sorted(units.items(), key=lambda u: -by_position[id(u[1])]):
        _fully_shard(name, module, mesh, fp32.get(module, policy))  # post-order: inner first
    _fully_shard("", model, mesh, policy)
    return model


def select_units(model: nn.Module, wrap_policy: WrapPolicy | None) -> dict[str, nn.Module]:
    """The modules ``wrap_policy`` makes units, by name (the root is not among them)."""
    if wrap_policy is None:
        return dict(default_units(model))
    wanted = policy_predicate(wrap_policy)
    owners = _parameter_owners(model)
    units = {}
    for name, module in model.named_modules():
        if module is model or not wanted(module):
            continue
        if not _has_forward(module):
            logger.debug("wrap_policy picked %s, a container without forward: skipped", name)
            continue
        shared = _shared_parameter(module, owners)
        if shared is not None:
            raise ValueError(
                f"wrap_policy picked module {name!r} ({type(module).__name__}), whose parameter "
                f"{shared!r} is shared with a module outside it (a tied weight?): leave it to "
                "the module that holds both"
            )
        if _has_parameters(module):
            units[name] = module
    return units


def policy_predicate(wrap_policy: WrapPolicy) -> Callable[[nn.Module], bool]:
    """``(module) -> bool`` for a wrap policy; ``TypeError``/``ValueError`` for a bad one."""
    if isinstance(wrap_policy, type):
        wrap_policy = (wrap_policy,)
    if callable(wrap_policy):
        return wrap_policy
    if isinstance(wrap_policy, (str, bytes)) or not isinstance(wrap_policy, Collection):
        raise TypeError(
            "wrap_policy must be module classes or a callable (module) -> bool, "
            f"got {wrap_policy!r}"
        )
    classes = tuple(wrap_policy)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"wrap_policy holds {cls!r}, which is not an nn.Module class")
        if not _has_forward(cls):
            raise ValueError(
                f"wrap_policy holds {cls.__name__}, a container without forward: name the "
                "class of its members instead"
            )
    return lambda module: isinstance(module, classes)


def default_units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The outermost repeated blocks, by name, each at most once."""
    owners = _parameter_owners(model)
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        blocks = _blocks_of(module)
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{name}"
            if name in blocks and _shared_parameter(child, owners) is None:
                yield path, child
            else:
                yield from visit(f"{path}.", child)

    yield from visit("", model)


def _blocks_of(container: nn.Module) -> set[str]:
    """Names of the members of ``container`` that are blocks to shard one by one."""
    members = [
        (n, m) for n, m in container.named_children()
        if _has_forward(m) and _has_parameters(m)
    ]
    if isinstance(container, nn.ModuleList):
        return {n for n, _ in members}
    if isinstance(container, nn.Sequential):
        composite = [(n, m) for n, m in members if any(True for _ in m.children())]
        counts: dict[type, int] = {}
        for _, m in composite:
            counts[type(m)] = counts.get(type(m), 0) + 1
        return {n for n, m in composite if counts[type(m)] >= 2}
    return set()


def adopt_sharded(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Check a model the user sharded: every parameter a shard over ``mesh`` (this node)."""
    node_ranks = mesh.mesh.flatten().tolist()
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        ranks = p.device_mesh.mesh.flatten().tolist()
        if p.device_mesh.ndim != 1 or ranks != node_ranks:
            raise ValueError(
                f"Parameter {name!r} is sharded over ranks {ranks} (mesh shape "
                f"{tuple(p.device_mesh.shape)}), not over this node's ranks {node_ranks}: "
                "shard with fully_shard(..., mesh=topology.mesh['shard'])"
            )
    if not isinstance(model, FSDPModule):
        _fully_shard("", model, mesh, MixedPrecisionPolicy())  # the user sharded blocks only
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise ValueError(
                f"Parameter {name!r} of the already-sharded model is not sharded (ignored by "
                "fully_shard?): every parameter must be sharded inside the node"
            )
    return model


def is_meta(model: nn.Module) -> bool:
    """Whether ``model`` is on the meta device; ``ValueError`` if only partly."""
    on_meta = {name: t.is_meta for name, t in _named_tensors(model)}
    if any(on_meta.values()) and not all(on_meta.values()):
        name = next(n for n, meta in on_meta.items() if meta)
        raise ValueError(
            f"The model is partly on the meta device ({name!r} is, others are not): "
            "build it all on meta or all on a device"
        )
    return any(on_meta.values())


def require_reset_parameters(model: nn.Module) -> None:
    """``ValueError`` naming a module that holds meta tensors but has no ``reset_parameters``."""
    for name, module in model.named_modules():
        own = [*module._parameters.values(), *module._buffers.values()]
        if any(t is not None and t.is_meta for t in own) and not hasattr(
            module, "reset_parameters"
        ):
            raise ValueError(
                f"Module {name or 'root'!r} ({type(module).__name__}) has tensors on the meta "
                "device and no reset_parameters(): initialise the model after deto.shard() "
                "and pass the sharded model instead"
            )


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model's (sharded) tensors on ``device`` and initialise them with
    each module's ``reset_parameters()`` (check first with :func:`require_reset_parameters`)."""
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _fully_shard(
    name: str, module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy
) -> None:
    try:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    except (AssertionError, RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"Cannot shard module {name or 'root'!r} ({type(module).__name__}): {exc}"
        ) from exc


def _has_forward(module: nn.Module | type[nn.Module]) -> bool:
    cls = module if isinstance(module, type) else type(module)
    return cls.forward is not nn.Module.forward


def _own_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _parameter_owners(model: nn.Module) -> dict[int, set[int]]:
    """For every parameter: the ids of the modules that register it directly."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    return owners


def _shared_parameter(module: nn.Module, owners: dict[int, set[int]]) -> str | None:
    """The name of a parameter of ``module`` that a module outside it registers too."""
    inside = {id(m) for m in module.modules()}
    for name, p in module.named_parameters():
        if not owners[id(p)] <= inside:
            return name
    return None


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
