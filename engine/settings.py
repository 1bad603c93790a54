"""Settings, read from ``ENGINE_*`` environment variables and a ``.env`` file.

Every setting is validated when it is first read, so a typo fails at start with the variable's
name and what was expected, not later inside a worker.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal, Optional
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError

#: Retry defaults. Dramatiq's own (20 retries over up to 7 days) surprise users: a job that
#: fails for a week before anyone sees it. Three retries after about 5 s, 10 s and 20 s (plus
#: jitter) cover transient faults; anything longer is the actor's choice via its options.
DEFAULT_MAX_RETRIES = 3
DEFAULT_MIN_BACKOFF_MS = 5_000
DEFAULT_MAX_BACKOFF_MS = 5 * 60_000


class Settings(BaseSettings):
    """The engine's configuration. See README.md for the meaning of each variable."""

    model_config = SettingsConfigDict(env_prefix="ENGINE_", env_file=".env", extra="ignore")

    broker_url: Optional[str] = Field(
        default=None, description="amqp:// URL of RabbitMQ; unset means the embedded SQLite broker"
    )
    store_url: str = Field(default="sqlite:///engine.db", description="sqlite:///path or postgresql://...")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    api_token: Optional[SecretStr] = Field(default=None, description="when set, every /api route needs it as a bearer token")
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1, description="larger request bodies are refused (413)")
    api_header_timeout_s: float = Field(
        default=10.0, gt=0, description="a client must send a request's line and headers within this; idle keep-alive too"
    )
    api_read_timeout_s: float = Field(default=30.0, gt=0, description="a client must send a request's body within this")
    api_max_connections: int = Field(
        default=256, ge=1, description="open connections the API serves at once (a thread each); more are refused"
    )
    metrics_scrape_timeout_s: float = Field(
        default=3.0, gt=0, description="GET /metrics waits this long at most for the store and the broker"
    )
    actor_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    schedules_file: Optional[Path] = Field(default=None, description="TOML file of cron schedules, applied at start")
    retention_days: float = Field(
        default=30, ge=0, description="finished jobs older than this are purged daily (schedule purge-jobs); 0: never"
    )
    output_dir: Path = Field(
        default=Path("engine-output"), description="where built-in actors write reports and thumbnails"
    )
    log_json: bool = False
    log_level: str = "INFO"

    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0)
    min_backoff_ms: int = Field(default=DEFAULT_MIN_BACKOFF_MS, ge=1)
    max_backoff_ms: int = Field(default=DEFAULT_MAX_BACKOFF_MS, ge=1)
    time_limit_ms: int = Field(default=10 * 60_000, ge=1, description="per attempt, unless an actor sets its own")
    result_max_bytes: int = Field(default=1_000_000, ge=1)
    traceback_max_bytes: int = Field(default=16_000, ge=256)

    worker_processes: int = Field(default=2, ge=1)
    worker_threads: int = Field(default=8, ge=1)
    shutdown_timeout_s: float = Field(default=600, gt=0, description="graceful stop before jobs are abandoned")
    prefetch: Optional[int] = Field(
        default=None, ge=1, description="messages a worker process runs at a time per queue; default: its thread count"
    )
    pin_cpus: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="pin each worker process to one CPU, round-robin; auto: when there are at least as many as CPUs",
    )
    sched_batch: bool = Field(
        default=True,
        description="run worker processes' threads under Linux's SCHED_BATCH policy (see engine.middleware.scheduling)",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="where a worker host serves /metrics; 0.0.0.0 for every interface"
    )
    metrics_port: Optional[int] = Field(
        default=None,
        ge=0,
        le=65535,
        description="port of a worker host's /metrics (engine worker, engine run, engine metrics-server); unset: none; 0: any free port",
    )

    heartbeat_interval_s: float = Field(default=2.0, gt=0, description="how often a worker process says it lives")
    worker_dead_after_s: float = Field(
        default=10.0, gt=0, description="a worker silent this long is dead: its running jobs are run again"
    )
    cancel_check_interval_s: float = Field(
        default=1.0, gt=0, description="how often workers look in the store for cancel requests they missed"
    )
    progress_interval_s: float = Field(
        default=0.5, ge=0, description="how often a job's progress is written, at most; its last value always is"
    )

    broker_pool_size: int = Field(default=8, ge=1, description="RabbitMQ connections shared by sending threads")
    rabbitmq_quorum_queues: bool = Field(default=False, description="replicated quorum queues (no priorities)")
    delay_hold_ms: int = Field(
        default=10 * 60_000,
        ge=1,
        description="delays longer than this wait in a TTL queue, not in a consumer: keep below consumer_timeout",
    )
    send_behind_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "how long a job sent without waiting is tried while RabbitMQ is down, before it is failed;"
            " also how often workers look for jobs whose sender died before sending them"
        ),
    )

    @field_validator("broker_url")
    @classmethod
    def _amqp_url(cls, value: Optional[str]) -> Optional[str]:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"expected an amqp://user:password@host:port/vhost URL, got {value!r}")
        return value

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme == "sqlite" and value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if scheme in ("postgresql", "postgres"):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if scheme == "postgresql+psycopg":
            return value
        raise ValueError(f"expected sqlite:///path/to/file.db or postgresql://user@host/db, got {value!r}")

    @field_validator("actor_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @property
    def embedded(self) -> bool:
        """True when no RabbitMQ is configured: the SQLite broker is used."""
        return self.broker_url is None


def load_settings() -> Settings:
    """Read and validate the settings.

    Raises:
      ConfigError: naming each bad variable and what it should hold.
    """
    try:
        return Settings()
    except ValidationError as error:
        problems = []
        for item in error.errors():
            variable = "ENGINE_" + "_".join(str(part) for part in item["loc"][:1]).upper()
            problems.append(f"{variable}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded once."""
    return load_settings()
