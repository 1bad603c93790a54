"""The engine's middleware; Dramatiq's own (TimeLimit, CurrentMessage, ...) are used as they are."""

from .heartbeat import Heartbeat
from .retries import Retries
from .tracking import Tracking, current_attempt

__all__ = ["Heartbeat", "Retries", "Tracking", "current_attempt"]
