"""The jobs `bench.cancel_latency` cancels while they run (``ENGINE_ACTOR_MODULES=bench.actors_cancel``)."""

from __future__ import annotations

import time

import engine


@engine.actor(max_retries=3, time_limit=600_000)
def tight_loop(seconds: float) -> None:
    """Pure Python that never looks for a cancel: only the thread interrupt stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@engine.actor(max_retries=3, time_limit=600_000)
def cooperative(seconds: float) -> None:
    """Small steps with progress and a cancel check between them, each ending in a short sleep."""
    deadline = time.monotonic() + seconds
    step = 0
    while time.monotonic() < deadline:
        step += 1
        engine.progress(min(99.0, step / 100), f"step {step}")
        engine.cancel_requested()
        time.sleep(0.005)
