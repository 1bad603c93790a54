"""The integration fixtures (`tests.integration.conftest`): engines in real processes."""

from tests.integration.conftest import amqp_vhost, engine_env, mode, pg_url, start_engine  # noqa: F401
