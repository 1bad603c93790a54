"""The helpers Dramatiq's tests import from ``tests/common.py``, which its source distribution
does not ship: copied there as ``common.py`` when the suite is unpacked (see suite.py).

Brokers are not built here: the tests that call ``skip_unless_rabbit_mq`` run only where
RabbitMQ is reachable, as the run that loads this module has checked.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from typing import Any, Iterator

import pika
import pytest
from dramatiq import Worker
from dramatiq.threading import is_gevent_active


@contextmanager
def worker(*args: Any, **kwargs: Any) -> Iterator[Worker]:
    """A started Worker, stopped on exit."""
    started = Worker(*args, **kwargs)
    started.start()
    try:
        yield started
    finally:
        started.stop()


skip_in_ci = pytest.mark.skipif(False, reason="never skipped in the engine's run")
skip_on_windows = pytest.mark.skipif(platform.system() == "Windows", reason="not on Windows")
skip_on_pypy = pytest.mark.skipif(platform.python_implementation() == "PyPy", reason="no time limits under PyPy")
skip_with_gevent = pytest.mark.skipif(is_gevent_active(), reason="differs under gevent")
skip_without_gevent = pytest.mark.skipif(not is_gevent_active(), reason="differs without gevent")
skip_unless_rabbit_mq = pytest.mark.skipif(False, reason="RabbitMQ is checked by the run")

RABBITMQ_USERNAME = os.getenv("RABBITMQ_USERNAME", "guest")
RABBITMQ_PASSWORD = os.getenv("RABBITMQ_PASSWORD", "guest")
RABBITMQ_CREDENTIALS = pika.credentials.PlainCredentials(RABBITMQ_USERNAME, RABBITMQ_PASSWORD)
