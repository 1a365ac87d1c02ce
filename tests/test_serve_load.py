"""How the load generator spreads questions over its connections (benchmarks/device/serve_load.py `--pick`)."""

from __future__ import annotations

import pytest
from realtime_qa.benchmarks.device.serve_load import picker


def test_round_robin_takes_each_connection_in_turn_whatever_is_in_flight() -> None:
    in_flight = {"a": 5, "b": 0, "c": 0}
    pick = picker(list(in_flight), in_flight.__getitem__, "round-robin")
    assert [pick() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_busy_takes_the_connection_with_fewest_in_flight() -> None:
    in_flight = {"a": 3, "b": 1, "c": 2}
    pick = picker(list(in_flight), in_flight.__getitem__, "least-busy")
    chosen = []
    for _ in range(4):  # each question stays in flight
        chosen.append(pick())
        in_flight[chosen[-1]] += 1
    # b (the only 1); b (ties with c at 2, and it is b's turn); c (the only 2); a (all at 3, a's turn)
    assert chosen == ["b", "b", "c", "a"]
    assert in_flight == {"a": 4, "b": 3, "c": 3}


@pytest.mark.parametrize("turns", [3, 7])
def test_least_busy_breaks_ties_in_turn(turns: int) -> None:
    pick = picker(["a", "b", "c"], lambda _: 0, "least-busy")
    assert [pick() for _ in range(turns)] == ["a", "b", "c", "a", "b", "c", "a"][:turns]
