"""FakeComm: simulated nodes in one process, counting exactly what a real Comm counts."""

from __future__ import annotations

import pytest
import torch

import deto
from deto.comm import all_gather_bytes, all_reduce_bytes, broadcast_bytes
from deto.testing import OutOfStep


def test_collectives_match_their_definitions_and_count_ring_bytes():
    fake = deto.FakeComm(nodes=3)

    def node(comm: deto.Comm) -> dict:
        r = float(comm.rank)
        mean = comm.all_reduce_mean([torch.full((4,), r), torch.full((2, 3), 10 * r)])
        gathered = comm.all_gather(
            [torch.tensor([comm.rank], dtype=torch.int16), torch.ones(2) * r]
        )
        mine = torch.full((5,), r)
        comm.broadcast([mine], src=2)
        return {"mean": mean, "gathered": gathered, "bcast": mine, "stats": comm.take_stats()}

    out = fake.run(node)
    for o in out:
        assert torch.equal(o["mean"][0], torch.full((4,), 1.0))
        assert torch.equal(o["mean"][1], torch.full((2, 3), 10.0))
        assert [int(g[0]) for g in o["gathered"]] == [0, 1, 2]
        assert [float(g[1][0]) for g in o["gathered"]] == [0.0, 1.0, 2.0]
        assert torch.equal(o["bcast"], torch.full((5,), 2.0))
        s = o["stats"]
        assert s.collectives == 3
        assert s.bytes_sent == s.bytes_received == (
            all_reduce_bytes(10 * 4, 3) + all_gather_bytes(2 + 8, 3) + broadcast_bytes(20, 3)
        )


def test_out_of_step_collectives_fail_on_every_node_instead_of_hanging():
    fake = deto.FakeComm(nodes=2, timeout_s=5)

    def node(comm: deto.Comm) -> str:
        try:
            if comm.rank == 0:
                comm.all_reduce_mean([torch.zeros(3)])
            else:
                comm.all_gather([torch.zeros(3)])
        except OutOfStep as e:
            return str(e)
        return "no error"

    out = fake.run(node)
    assert all("Collectives out of step" in m for m in out), out


def test_a_failing_node_releases_the_others_and_its_error_is_raised():
    fake = deto.FakeComm(nodes=2, timeout_s=30)

    def node(comm: deto.Comm) -> None:
        if comm.rank == 1:
            raise KeyError("node 1 broke")
        comm.all_reduce_mean([torch.zeros(1)])

    with pytest.raises(KeyError, match="node 1 broke"):
        fake.run(node)
    # the group is usable again afterwards
    assert fake.run(lambda comm: comm.all_reduce_mean([torch.ones(1)])[0].item()) == [1.0, 1.0]


def test_a_node_that_finishes_early_is_reported():
    fake = deto.FakeComm(nodes=2, timeout_s=30)

    def node(comm: deto.Comm) -> None:
        if comm.rank == 0:
            comm.all_reduce_mean([torch.zeros(1)])

    with pytest.raises(OutOfStep):
        fake.run(node)
