"""Dramatiq brokers the engine brings: `SQLiteBroker`, the embedded one, and `RabbitmqBroker`,
Dramatiq's RabbitMQ broker with long delays, a bounded connection pool and queue depths."""

from .rabbitmq import RabbitmqBroker
from .sqlite import SQLiteBroker

__all__ = ["RabbitmqBroker", "SQLiteBroker"]
