"""Dramatiq brokers the engine brings: `SQLiteBroker`, the embedded one (RabbitMQ is Dramatiq's own)."""

from .sqlite import SQLiteBroker

__all__ = ["SQLiteBroker"]
