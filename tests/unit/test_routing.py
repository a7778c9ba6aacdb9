"""Routing: which replicator handles each gradient on a step."""

from __future__ import annotations

from deto.routing import Routes, route


def test_the_first_covering_replicator_that_fires_takes_the_gradient():
    # parameter 0: replicators 0 and 1; 1: only 1; 2: none; 3: 1 then 0
    coverage = [[0, 1], [1], [], [1, 0]]
    routes = route(coverage, [True, True], range(4))
    assert routes == Routes(fired={0: [0], 1: [1, 3]}, deferred={}, uncovered=[2])


def test_a_later_replicator_fires_when_the_first_rests():
    routes = route([[0, 1], [1]], [False, True], [0, 1])
    assert routes.fired == {1: [0, 1]} and not routes.deferred


def test_when_none_fires_the_first_covering_one_defers():
    routes = route([[0, 1], [1], []], [False, False], [0, 1, 2])
    assert routes.fired == {}
    assert routes.deferred == {0: [0], 1: [1]}
    assert routes.uncovered == [2]


def test_only_parameters_with_a_gradient_are_routed_in_index_order():
    routes = route([[0], [0], [0]], [True], [2, 0])
    assert routes.fired == {0: [0, 2]}


def test_replicators_covering_nothing_do_not_appear():
    routes = route([[1]], [True, True], [0])
    assert list(routes.fired) == [1]
