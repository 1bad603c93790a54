"""Dramatiq's Retries, with the engine's defaults; `PermanentError` and `JobCanceled` never retried."""

from __future__ import annotations

from dramatiq import Actor, Broker
from dramatiq.middleware import Retries as DramatiqRetries

from ..errors import JobCanceled, PermanentError

#: Exceptions that end a job at once, whatever its retry options: added to every actor's ``throws``.
NEVER_RETRIED = (PermanentError, JobCanceled)


class Retries(DramatiqRetries):
    """Retries failed jobs with exponential backoff and jitter (Dramatiq's own logic).

    Every actor's ``throws`` option is extended with `PermanentError` and `JobCanceled` when it
    is declared, so that Dramatiq ends such a job at once however the actor was declared: a
    permanent error fails it, a cancel cancels it. The engine's defaults (see
    `engine.settings`) are passed in by `engine.app.build_middleware`.
    """

    def after_declare_actor(self, broker: Broker, actor: Actor) -> None:
        throws = actor.options.get("throws") or ()
        if not isinstance(throws, tuple):
            throws = (throws,)
        missing = tuple(error for error in NEVER_RETRIED if error not in throws)
        if missing:
            actor.options["throws"] = (*missing, *throws)
