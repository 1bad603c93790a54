"""Actors that tests run in real worker processes (ENGINE_ACTOR_MODULES=tests.support.actors).

Each run of a job body appends a line to ``$ENGINE_TEST_SIDE_EFFECTS/<job id>`` when it
completes, so a test can count how many times a body really ran to the end.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from dramatiq.middleware import CurrentMessage
from loguru import logger

import engine


def _record_completion() -> None:
    folder = os.environ.get("ENGINE_TEST_SIDE_EFFECTS")
    if folder:
        job_id = CurrentMessage.get_current_message().message_id
        with open(Path(folder) / job_id, "a") as counter:
            counter.write(f"{os.getpid()}\n")


@engine.actor
def echo(value):
    _record_completion()
    return value


@engine.actor
def sleepy(seconds: float):
    time.sleep(seconds)
    _record_completion()
    return seconds


@engine.actor(max_retries=3, min_backoff=200, max_backoff=5_000)
def flaky(failures: int):
    """Fails its first `failures` attempts."""
    return _fail_first(failures)


def _fail_first(failures: int) -> int:
    """Raise in the first `failures` attempts; the attempt's number after them."""
    attempt = CurrentMessage.get_current_message().options.get("retries", 0) + 1
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt} failed")
    _record_completion()
    return attempt


@engine.actor(max_retries=1, min_backoff=10, max_backoff=20)
def chatty_failure(text: str):
    """Logs `text` through loguru and through the standard library's logging, then fails; twice
    (one retry)."""
    logger.info("loguru says {}", text)
    logging.getLogger("tests.user").warning("logging says %s", text)
    raise ValueError(f"failed after saying {text}")


@engine.actor(max_retries=5)
def hopeless():
    raise engine.PermanentError("this input can never succeed")


@engine.actor(time_limit=300, max_retries=0)
def busy_loop(seconds: float):
    """A pure-Python loop that only a thread interrupt can stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@engine.actor
def counted(steps: int):
    for step in range(1, steps + 1):
        engine.progress(100 * step / steps, f"step {step} of {steps}")
        time.sleep(0.01)
    return {"steps": steps}


# -- cancellation ---------------------------------------------------------------------------------


def _record_start() -> None:
    """Appends a line to ``$ENGINE_TEST_SIDE_EFFECTS/<job id>.started`` each time a body starts."""
    folder = os.environ.get("ENGINE_TEST_SIDE_EFFECTS")
    if folder:
        job_id = CurrentMessage.get_current_message().message_id
        with open(Path(folder) / f"{job_id}.started", "a") as starts:
            starts.write(f"{os.getpid()}\n")


@engine.actor(max_retries=3, min_backoff=100)
def tight_loop(seconds: float):
    """A pure-Python loop that never checks for a cancel: only a thread interrupt stops it."""
    _record_start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    _record_completion()


@engine.actor(max_retries=3, min_backoff=100)
def cooperative(steps: int):
    """Reports progress and checks for a cancel at each step; its ``except Exception`` must not
    swallow the cancel."""
    _record_start()
    for step in range(1, steps + 1):
        try:
            engine.progress(100 * step / steps, f"step {step} of {steps}")
            engine.cancel_requested()
            time.sleep(0.01)
        except Exception:
            pass
    _record_completion()


@engine.actor(max_retries=3, min_backoff=4_000, max_backoff=4_000)
def always_failing():
    """Fails every attempt, then waits 2 to 4 s as `scheduled` before the next."""
    _record_start()
    raise ConnectionError("still down")


@engine.actor(max_retries=3, min_backoff=0)
def flaky_at_once(failures: int):
    """Fails its first `failures` attempts, each retried with no backoff."""
    return _fail_first(failures)


@engine.actor(max_retries=3, max_backoff=1)
def flaky_within_a_millisecond(failures: int):
    """Fails its first `failures` attempts; a backoff of at most 1 ms rounds down to none."""
    return _fail_first(failures)


@engine.actor
def fan_out(count: int):
    """Sends `count` echo jobs: jobs enqueued from inside a worker process."""
    for number in range(count):
        echo.send(number)
