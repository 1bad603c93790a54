"""Arguments: a send whose arguments do not fit the actor fails at once, and nothing is enqueued."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

import pytest

import engine
from engine.errors import InvalidArguments
from engine.middleware.arguments import Arguments


@pytest.fixture
def actors(stub_broker):
    @engine.actor
    def slow(n: int, label: str = "x", *, when: Optional[datetime] = None):
        return n

    @engine.actor
    def untyped(a, b=1):
        return a

    @engine.actor
    def spread(*values: int, **named: float):
        return values

    return slow, untyped, spread


def _jobs() -> int:
    return len(engine.jobs(limit=1000).jobs)


def test_fitting_arguments_are_sent(actors):
    slow, untyped, spread = actors
    slow.send(3)
    slow.send(3, "y", when="2026-01-31T12:00:00Z")  # JSON has no datetime: its ISO form fits
    untyped.send("anything", b=[1])
    spread.send(1, 2, 3, ratio=0.5, whole=2)
    assert _jobs() == 4


@pytest.mark.parametrize(
    ("args", "kwargs", "where"),
    [
        (("notanint",), {}, ["args.0"]),
        (("5",), {}, ["args.0"]),  # the worker would get a str: strict, not coerced
        ((1.5,), {}, ["args.0"]),
        ((), {}, ["n"]),
        ((1,), {"colour": "red"}, ["kwargs.colour"]),
        ((1, "a", "b"), {}, ["args.2"]),
        ((1,), {"n": 2}, ["kwargs.n"]),
        ((1,), {"when": "yesterday"}, ["kwargs.when"]),
        ((), {"n": "x", "label": 3}, ["kwargs.n", "kwargs.label"]),
    ],
)
def test_arguments_that_do_not_fit_fail_the_send_and_nothing_is_enqueued(actors, stub_broker, args, kwargs, where):
    slow = actors[0]
    with pytest.raises(InvalidArguments) as raised:
        slow.send(*args, **kwargs)
    assert [problem[0] for problem in raised.value.problems] == where
    assert "slow" in str(raised.value) and "nothing was enqueued" in str(raised.value)
    assert _jobs() == 0 and stub_broker.queues["default"].qsize() == 0


def test_untyped_and_variadic_actors_are_checked_by_their_signature(actors):
    _, untyped, spread = actors
    with pytest.raises(InvalidArguments, match="missing required argument"):
        untyped.send()
    with pytest.raises(InvalidArguments) as raised:
        spread.send(1, "two", ratio="half")
    assert [problem[0] for problem in raised.value.problems] == ["args.1", "kwargs.ratio"]


def test_submit_checks_them_too(actors):
    with pytest.raises(InvalidArguments):
        engine.submit("slow", "notanint")
    assert _jobs() == 0


def test_the_check_of_an_actor_is_built_once(actors, stub_broker):
    slow = actors[0]
    middleware = next(m for m in stub_broker.middleware if isinstance(m, Arguments))
    for n in range(3):
        slow.send(n)
    assert list(middleware._checks) == [slow.fn]
