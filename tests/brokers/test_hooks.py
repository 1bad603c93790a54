"""HookDispatch: only the middleware that implement a hook are called, in Dramatiq's order, with
Dramatiq's error handling."""

from __future__ import annotations

import pytest
from dramatiq import Middleware
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import MiddlewareError, SkipMessage

from engine.brokers.hooks import HookDispatch


class _Broker(HookDispatch, StubBroker):
    pass


class _Recording(Middleware):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def before_ack(self, broker, message):
        self.calls.append(f"before {self.name}")

    def after_ack(self, broker, message):
        self.calls.append(f"after {self.name}")


class _Failing(Middleware):
    def before_ack(self, broker, message):
        raise RuntimeError("broken hook")


class _Skipping(Middleware):
    def before_ack(self, broker, message):
        raise SkipMessage("skip it")


def test_before_hooks_run_in_order_and_after_hooks_in_reverse():
    calls: list[str] = []
    broker = _Broker(middleware=[_Recording("a", calls), Middleware(), _Recording("b", calls)])

    broker.emit_before("ack", None)
    broker.emit_after("ack", None)

    assert calls == ["before a", "before b", "after b", "after a"]


def test_the_empty_hooks_of_middleware_without_one_are_not_called(monkeypatch):
    empty_calls = []
    monkeypatch.setattr(Middleware, "before_ack", lambda self, broker, message: empty_calls.append(self))
    calls: list[str] = []
    broker = _Broker(middleware=[Middleware(), _Recording("a", calls), Middleware()])

    broker.emit_before("ack", None)

    assert calls == ["before a"]
    assert empty_calls == []


def test_middleware_added_after_a_signal_was_emitted_gets_it_next_time():
    calls: list[str] = []
    broker = _Broker(middleware=[_Recording("a", calls)])
    broker.emit_before("ack", None)

    broker.add_middleware(_Recording("b", calls))
    broker.middleware.insert(0, _Recording("c", calls))
    broker.emit_before("ack", None)

    assert calls == ["before a", "before c", "before a", "before b"]


def test_a_failing_hook_is_logged_and_the_next_one_still_runs(caplog):
    calls: list[str] = []
    broker = _Broker(middleware=[_Failing(), _Recording("a", calls)])

    broker.emit_before("ack", None)

    assert calls == ["before a"]
    assert "Unexpected failure in before_ack" in caplog.text
    assert "broken hook" in caplog.text


def test_a_middleware_error_of_a_before_hook_reaches_the_caller():
    calls: list[str] = []
    broker = _Broker(middleware=[_Skipping(), _Recording("a", calls)])

    with pytest.raises(MiddlewareError):
        broker.emit_before("ack", None)
    assert calls == []
