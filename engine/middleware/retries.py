"""Dramatiq's Retries, with the engine's defaults and `PermanentError` never retried."""

from __future__ import annotations

from dramatiq import Actor, Broker
from dramatiq.middleware import Retries as DramatiqRetries

from ..errors import PermanentError


class Retries(DramatiqRetries):
    """Retries failed jobs with exponential backoff and jitter (Dramatiq's own logic).

    Every actor's ``throws`` option is extended with `PermanentError` when it is declared, so
    that Dramatiq fails such a job at once however the actor was declared. The engine's
    defaults (see `engine.settings`) are passed in by `engine.broker.build_middleware`.
    """

    def after_declare_actor(self, broker: Broker, actor: Actor) -> None:
        throws = actor.options.get("throws") or ()
        if not isinstance(throws, tuple):
            throws = (throws,)
        if PermanentError not in throws:
            actor.options["throws"] = (PermanentError, *throws)
