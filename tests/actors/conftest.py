"""Fixtures for the built-in actors' tests: real jobs on the StubBroker, real files in tmp_path."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Callable

import pytest


@pytest.fixture
def declare(stub_broker) -> Callable[[str], ModuleType]:
    """Import an actor module, or import it again, so that it declares its actor on this test's
    broker: each test gets a fresh StubBroker, and a module is imported only once per process."""

    def declare(module_name: str) -> ModuleType:
        module = sys.modules.get(module_name)
        return importlib.reload(module) if module else importlib.import_module(module_name)

    return declare


@pytest.fixture
def wait_done(stub_broker, stub_worker) -> Callable[[], None]:
    """Wait until every job sent so far has ended, retries included."""

    def wait_done() -> None:
        stub_broker.join("default", fail_fast=False)
        stub_worker.join()

    return wait_done
