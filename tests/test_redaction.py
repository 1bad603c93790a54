"""engine.redaction: URL passwords and the settings' secrets masked in text and log records."""

from __future__ import annotations

import pytest
from loguru import logger

from engine import redaction
from engine.redaction import mask, mask_urls, remember_secrets
from engine.errors import ConfigError
from engine.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def no_remembered_secrets():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("amqp://engine:s3cret@rabbit:5672/jobs", "amqp://engine:***@rabbit:5672/jobs"),
        ("postgresql://engine:s3cret@db/engine", "postgresql://engine:***@db/engine"),
        ("postgresql+psycopg://engine:s3cret@db:5432/engine?sslmode=require", "postgresql+psycopg://engine:***@db:5432/engine?sslmode=require"),
        ("AMQPS://engine:s3cret@rabbit", "AMQPS://engine:***@rabbit"),
        # Percent-encoded, or not encoded at all: pika takes the host after the last "@".
        ("amqp://engine:p%40ss%2Fw%3Ard@rabbit/jobs", "amqp://engine:***@rabbit/jobs"),
        ("amqp://engine:p@ss:w@rd@rabbit/jobs", "amqp://engine:***@rabbit/jobs"),
        ("amqp://:s3cret@rabbit", "amqp://:***@rabbit"),
        # In a sentence, quoted, several in one text.
        (
            "lost 'amqp://a:one@h1/v', then postgresql://b:two@h2/db (twice: postgresql://b:two@h2/db).",
            "lost 'amqp://a:***@h1/v', then postgresql://b:***@h2/db (twice: postgresql://b:***@h2/db).",
        ),
        ("ConnectionError('amqp://a:one@h1')", "ConnectionError('amqp://a:***@h1')"),
    ],
)
def test_the_password_of_a_url_is_masked_and_the_rest_kept(text, masked):
    assert mask_urls(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "amqp://engine@rabbit:5672/jobs",  # a user, no password
        "amqp://rabbit:5672/jobs",
        "http://127.0.0.1:8080/api/jobs?actor=echo@default",  # a port, and an "@" after the path
        "sqlite:////var/lib/engine/engine.db",
        "ratio 3:2 @ noon, mail to ops@example.com",
        "amqp://engine:@rabbit",  # an empty password
    ],
)
def test_text_without_a_url_password_is_unchanged(text):
    assert mask_urls(text) == text


def test_the_settings_secrets_are_masked_anywhere_once_remembered():
    settings = Settings(
        broker_url="amqp://engine:rabbit%2Fpass@rabbit/jobs",
        store_url="postgresql://engine:pg/pass@db/engine",  # SQLAlchemy allows a "/" in a password
        api_token="t0ken-of-the-api",
    )
    text = "token t0ken-of-the-api, decoded rabbit/pass, written rabbit%2Fpass, and pg/pass"
    assert mask(text) == text

    remember_secrets(settings)

    assert mask(text) == "token ***, decoded ***, written ***, and ***"
    assert mask("postgresql://engine:pg/pass@db/engine") == "postgresql://engine:***@db/engine"


def test_a_short_password_is_masked_in_urls_only():
    remember_secrets(Settings(broker_url="amqp://engine:abc@rabbit/jobs"))

    assert mask("abc amqp://engine:abc@rabbit/jobs") == "abc amqp://engine:***@rabbit/jobs"


def test_a_settings_error_does_not_quote_the_password(monkeypatch):
    monkeypatch.setenv("ENGINE_BROKER_URL", "http://engine:s3cret@rabbit/jobs")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert "s3cret" not in str(raised.value) and "http://engine:***@rabbit/jobs" in str(raised.value)


def test_the_repr_of_settings_shows_no_secret():
    settings = Settings(broker_url="amqp://engine:s3cret@rabbit/jobs", store_url="postgresql://engine:s3cret@db/engine", api_token="t0ken")

    assert "s3cret" not in repr(settings) and "t0ken" not in repr(settings)
    assert "amqp://engine:***@rabbit/jobs" in repr(settings)


def test_the_patcher_masks_a_log_record_s_message_and_extras():
    remember_secrets(Settings(api_token="t0ken-of-the-api"))
    records = []
    sink = logger.patch(redaction.mask_record)
    handler = logger.add(lambda message: records.append(message.record), format="{message}")
    try:
        sink.bind(url="amqp://a:one@h1/v", count=3).warning("lost {} with {}", "postgresql://b:two@h2/db", "t0ken-of-the-api")
    finally:
        logger.remove(handler)

    [record] = records
    assert record["message"] == "lost postgresql://b:***@h2/db with ***"
    assert record["extra"] == {"url": "amqp://a:***@h1/v", "count": 3}
