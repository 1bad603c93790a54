"""Secrets kept out of logs and error output: the one place where they are masked.

Two kinds of secret are replaced by ``***``:

- the password of any URL in a text (``amqp://user:***@host/vhost``), whatever URL it is:
  pika, SQLAlchemy and psycopg errors may embed a connection string, and so may a user's;
- the secrets of this process's settings, wherever they appear, even outside a URL: the API
  token and the passwords of the broker and store URLs, as written and percent-decoded.

`mask` does both to a text; `mask_record` is the loguru patcher that `engine.logging` installs,
so that every log line's message and extras are masked, and `engine.logging` masks exception
text with `mask` when it formats it. The CLI and the worker mask their error output with it,
the store the errors and tracebacks of attempts it records (shown by the API and the CLI), and
the settings their own error messages and ``repr``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from .settings import Settings

#: What a secret is replaced by.
MASK = "***"

#: Secrets shorter than this are masked inside URLs only: replacing a one- or two-character
#: password wherever it appears would garble every line.
MIN_SECRET_CHARS = 4

# scheme://user:password@ where the password runs to the last "@" before the URL's path, query,
# fragment or a blank: pika reads an unencoded "@" in a password the same way (the host is after
# the last one). A password that is not followed by "@" is no password (``http://host:8080/``).
_URL_PASSWORD = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*://[^\s:/?#@]*:)([^\s/?#]*)@")

_known_secrets: set[str] = set()

__all__ = ["MASK", "forget_secrets", "mask", "mask_record", "mask_urls", "remember_secrets"]


def mask_urls(text: str) -> str:
    """`text` with the password of every URL in it replaced by ``***``; the user is kept.

    >>> mask_urls("lost amqp://engine:s3cret@rabbit:5672/jobs")
    'lost amqp://engine:***@rabbit:5672/jobs'
    """
    return _URL_PASSWORD.sub(lambda found: f"{found.group(1)}{MASK}@" if found.group(2) else found.group(0), text)


def mask(text: str) -> str:
    """`text` with URL passwords and the remembered secrets (`remember_secrets`) masked."""
    masked = mask_urls(text)
    for secret in sorted(_known_secrets, key=len, reverse=True):  # a secret within a longer one
        masked = masked.replace(secret, MASK)
    return masked


def remember_secrets(settings: Settings) -> None:
    """Mask, from now on, the secrets of `settings` wherever they appear: the API token, and the
    passwords of the broker and store URLs (as written and percent-decoded)."""
    candidates = [settings.api_token.get_secret_value() if settings.api_token else None]
    for url in filter(None, [settings.broker_url, settings.store_url]):
        candidates += _passwords(url)
    _known_secrets.update(secret for secret in candidates if secret and len(secret) >= MIN_SECRET_CHARS)


def forget_secrets() -> None:
    """Forget the remembered secrets (for tests that remember some of their own)."""
    _known_secrets.clear()


def mask_record(record: dict[str, Any]) -> None:
    """A loguru patcher: the record's message and string extras, masked (see `mask`).

    Exceptions are not in the record as text: whoever formats one masks it (`engine.logging`).
    """
    record["message"] = mask(record["message"])
    extra = record["extra"]
    for key, value in extra.items():
        if isinstance(value, str):
            extra[key] = mask(value)


def _passwords(url: str) -> list[str]:
    """The password of `url` in each form it may be shown in: as written and percent-decoded,
    as pika reads it (the host after the last "@"), and as SQLAlchemy does (its own parser,
    which allows a "/" in a password)."""
    written = urlsplit(url).netloc.rpartition("@")[0].partition(":")[2]
    try:
        decoded_by_sqlalchemy = make_url(url).password
    except ArgumentError:  # not a URL SQLAlchemy reads: an amqp:// one may not be
        decoded_by_sqlalchemy = None
    return [written, unquote(written), decoded_by_sqlalchemy or ""]
