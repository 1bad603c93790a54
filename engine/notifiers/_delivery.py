"""Handing a received notification to its listener's callback, whatever the transport."""

from __future__ import annotations

from typing import Callable

from loguru import logger

#: What a listener calls with each message it receives.
OnMessage = Callable[[bytes], object]


def deliver(on_message: OnMessage, message: bytes, source: object) -> None:
    """Call `on_message`; an error in it is logged, so that the listener goes on listening."""
    try:
        on_message(message)
    except Exception:
        logger.exception("Failed to handle the notification {!r} from {}.", message, source)
