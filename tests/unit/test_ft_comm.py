"""FTComm, the replicate axis on torchft, under the DiLoCo family, on simulated nodes in one
process: torchft's Manager and group are stood in for by each simulated node's in-memory
transport, so FTComm's own code (coalescing, packing, counting) runs as it does on torchft,
and a run over it must equal the same run over deto's Comm, bit for bit and byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deto

pytest.importorskip("torchft")

from deto.ft import FTComm, load_replica_state, replica_state  # noqa: E402

STEPS = 6


class _Finished:
    """A torchft work handle whose collective has already run."""

    def wait(self) -> None:
        return None


class _Manager:
    """What FTComm asks of torchft's Manager, over one simulated node's transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def num_participants(self) -> int:
        return int(self.transport.size)

    def participating_rank(self) -> int:
        return int(self.transport.rank)

    def allreduce(self, flat: torch.Tensor) -> _Finished:  # torchft averages over the quorum
        self.transport.all_reduce_sum(flat)
        flat.div_(self.transport.size)
        return _Finished()

    def errored(self) -> None:
        return None

    def report_error(self, exc: BaseException) -> None:
        raise AssertionError(f"no collective fails here: {exc}")


class _Group:
    """What FTComm asks of torchft's ProcessGroupGloo, over the same transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  options: Any) -> _Finished:  # fmt: skip
        (parts,), (buffer,) = outputs, inputs
        gathered = buffer.new_empty(len(parts) * buffer.numel())
        self.transport.all_gather(gathered, buffer)
        for part, mine in zip(parts, gathered.chunk(len(parts)), strict=True):
            part.copy_(mine)
        return _Finished()


def ft_comm(comm: deto.Comm) -> FTComm:
    ft = FTComm(_Manager(comm.transport), _Group(comm.transport))  # type: ignore[arg-type]
    ft.refresh()
    return ft


def _layers() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 5))


torch.manual_seed(0)
INITIAL = _layers().state_dict()  # drawn once: the nodes' threads share torch's generator


def _net() -> nn.Module:
    model = _layers()
    model.load_state_dict(INITIAL)
    return model


def _optimizer(model: nn.Module, make: Any, comm: deto.Comm) -> deto.DecoupledOptimizer:
    names = {p: n for n, p in model.named_parameters()}
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return deto.DecoupledOptimizer(base, [make()], comm, param_names=names, sign=False)


def _train(model: nn.Module, opt: deto.DecoupledOptimizer, node: int) -> list[int]:
    sent = []
    for step in range(STEPS):
        x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1000 * step + node))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sent.append(opt.stats().bytes_sent)
    return sent


def _run(make: Any, on_torchft: bool) -> list[tuple[list[torch.Tensor], list[int]]]:
    def node(comm: deto.Comm) -> tuple[list[torch.Tensor], list[int]]:
        model = _net()
        opt = _optimizer(model, make, ft_comm(comm) if on_torchft else comm)
        sent = _train(model, opt, comm.rank)
        return [p.detach().clone() for p in model.parameters()], sent

    return deto.FakeComm(nodes=2).run(node)


FAMILY = {
    "sparseloco": lambda: deto.DiLoCo(every=3, compress="topk", topk=16, chunk=8),
    "diloco-demo": lambda: deto.DiLoCo(every=3, compress="demo", topk=16, chunk=8),
    "diloco": lambda: deto.DiLoCo(every=3),
    "streaming-diloco": lambda: deto.StreamingDiLoCo(every=3, fragments=2),
    "streaming-diloco-fp32": lambda: deto.StreamingDiLoCo(every=3, fragments=2, values="fp32"),
}


@pytest.mark.parametrize("scheme", sorted(FAMILY))
def test_on_torchft_s_group_each_scheme_trains_as_on_deto_s_comm(scheme: str) -> None:
    make = FAMILY[scheme]
    ft, plain = _run(make, on_torchft=True), _run(make, on_torchft=False)
    for (params, sent), (want, want_sent) in zip(ft, plain, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(params, want, strict=True))
        assert sent == want_sent and sum(sent) > 0  # every sync's bytes, counted alike
    if scheme.startswith(("sparseloco", "diloco")):  # synced on step 6: the nodes agree
        assert all(torch.equal(a, b) for a, b in zip(ft[0][0], ft[1][0], strict=True))


def test_torchft_s_group_runs_no_exchange_in_flight() -> None:
    """Streaming DiLoCo with overlap_steps > 0 needs an asynchronous all-gather: refused, so
    deto train refuses the combination before it starts."""
    with pytest.raises(NotImplementedError, match="gathers synchronously"):
        _run(lambda: deto.StreamingDiLoCo(every=3, fragments=2, overlap_steps=1), True)


def test_a_joining_node_starts_its_error_feedback_at_zero() -> None:
    """SparseLoCo's error buffer is this node's own unsent pseudo-gradient: a node that joins
    takes its peer's anchor, momentum and parameters, and none of the peer's residual."""

    def node(comm: deto.Comm) -> tuple[dict[str, Any], deto.DecoupledOptimizer, nn.Module]:
        model = _net()
        opt = _optimizer(model, FAMILY["sparseloco"], ft_comm(comm))
        _train(model, opt, comm.rank)
        return replica_state(model, opt), opt, model

    (peer, peer_opt, _), (_, opt, model) = deto.FakeComm(nodes=2).run(node)
    assert all(st["error"].any() for st in peer_opt.replicators[0].state)
    load_replica_state(model, opt, peer, joining=True)
    state = opt.replicators[0].state
    assert all(not st["error"].any() for st in state)
    coder = opt.replicators[0].coder
    assert coder is not None and all(not st["delta"].any() for st in coder.state)  # what it sends
    for mine, theirs in zip(state, peer_opt.replicators[0].state, strict=True):
        assert torch.equal(mine["anchor"], theirs["anchor"])
        assert torch.equal(mine["momentum"], theirs["momentum"])
