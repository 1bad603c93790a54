"""The store's tests run on SQLite (`store`, from tests/conftest.py) and, where the module says
so, on a PostgreSQL database of their own (`pg_url`)."""

from tests.integration.conftest import pg_url  # noqa: F401 (a fixture, shared with the integration tests)
