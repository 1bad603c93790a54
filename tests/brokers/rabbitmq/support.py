"""What the RabbitMQ broker's tests share beside their fixtures: an actor that records when it
ran, counts of this process's connections, rabbitmqctl, and a broker with the engine's middleware."""

from __future__ import annotations

import subprocess
import time

import dramatiq
import psutil

from engine.app import build_broker
from engine.brokers import RabbitmqBroker
from engine.settings import Settings
from engine.store import Store

from tests.integration.conftest import _unavailable

HOLD_MS = 1_000


class Runs:
    """An actor body that records when it ran."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, *args) -> None:
        self.times.append(time.time())


def recorder(broker: RabbitmqBroker, queue: str) -> tuple[dramatiq.Actor, Runs]:
    runs = Runs()
    return dramatiq.actor(runs, broker=broker, queue_name=queue, actor_name=f"record_{queue}"), runs


def store_of(broker: RabbitmqBroker) -> Store:
    return broker.store


def rabbitmq_connections() -> int:
    """How many connections this process has open to RabbitMQ."""
    return sum(
        1
        for each in psutil.Process().net_connections(kind="tcp")
        if each.raddr and each.raddr.port == 5672 and each.status == psutil.CONN_ESTABLISHED
    )


def rabbitmqctl(*args: str) -> str:
    try:
        done = subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        _unavailable("rabbitmqctl", error)
    return done.stdout.strip()


def tracked_broker(tmp_path, url: str, **settings) -> RabbitmqBroker:
    settings = Settings(store_url=f"sqlite:///{tmp_path}/engine.db", broker_url=url, **settings)
    return build_broker(settings)  # with the engine's middleware and a migrated store
