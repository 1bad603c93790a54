"""The store's tables, with indexes chosen for the queries the engine runs.

- jobs: one row per job; the source of truth for its state (Oban's model).
- attempts: one row per execution that ended (an error, a time-out, a cancel, an abandoned
  run), kept when the job later succeeds: the audit trail. Except one: the attempt that ends
  its job as `succeeded` stays in its job's row, where its worker and start were written
  while it ran (`attempt_*`, `started_at`), with its end (`finished_at`). Most jobs succeed
  at their first attempt and then cost no attempt row; `engine.store.Store.list_attempts`
  puts the trail together.
- workers: one row per worker process, with its heartbeat: how a job whose worker died is told
  from one whose worker is merely slow.
- messages: the embedded broker's queue; unused when RabbitMQ is the broker.
- schedules, schedule_fires, schedule_versions: cron schedules, the ledger of their fires
  (one row per schedule and fire time: the unique key that makes a fire happen once, however
  many schedulers run) and the counter schedulers poll to learn of changes (see `scheduler`).
- schema_version: the migration level (see `engine.store.migrations`).

Timestamps are float seconds since the epoch: portable between SQLite and PostgreSQL, ordered,
and cheap to compare in the queue's due-time scans.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

#: An auto-incrementing key: BIGINT on PostgreSQL, the rowid alias on SQLite.
_AutoId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),  # the Dramatiq message id
    Column("actor", String(200), nullable=False),
    Column("queue", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("args", Text, nullable=False),  # JSON
    Column("kwargs", Text, nullable=False),  # JSON
    Column("options", Text, nullable=False),  # JSON: the message options, to requeue it on retry
    Column("priority", Integer, nullable=False, default=0),
    Column("idempotency_key", String(255)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("progress_percent", Float),
    Column("progress_message", Text),
    Column("result", Text),  # JSON
    Column("last_error", Text),
    Column("cancel_requested_at", Float),  # durable: a worker cut off from the push still sees it
    Column("created_at", Float, nullable=False),
    Column("scheduled_for", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    # The latest attempt's worker and start token (its start is `started_at`). An attempt's row
    # is written once, when it ends, from what its worker kept: a start is then one update of
    # this row, and a redelivery reads here whether the worker running the job still lives.
    Column("attempt_host", String(255)),
    Column("attempt_pid", Integer),
    Column("attempt_worker_id", String(64)),
    Column("attempt_token", Float),
    # The cron schedule that created the job, and the fire time it is for (see `scheduler`).
    Column("schedule", String(100)),
    Column("fire_time", Float),
    # Newest-first listing, whole or filtered, with keyset pagination on (created_at, id).
    Index("ix_jobs_created", "created_at", "id"),
    Index("ix_jobs_state_created", "state", "created_at", "id"),
    Index("ix_jobs_actor_created", "actor", "created_at", "id"),
    Index("ix_jobs_queue_created", "queue", "created_at", "id"),
    # Retention purges by age through the created_at indexes. An index on finished_at would
    # cost every job two entries: an update that changes an indexed column (each start and
    # end changes `state`) adds the new row version to every index on PostgreSQL.
)

#: A job sent with an idempotency key is sent once. Most jobs have none, and only the rows
#: with one are in this index, so the others do not pay for it.
idempotency_keys = Index(
    "uq_jobs_idempotency_key",
    jobs.c.idempotency_key,
    unique=True,
    postgresql_where=jobs.c.idempotency_key.isnot(None),
    sqlite_where=jobs.c.idempotency_key.isnot(None),
)

#: `engine.jobs(schedule=NAME)`, newest first. Only the jobs of schedules are in it.
schedule_jobs = Index(
    "ix_jobs_schedule_created",
    jobs.c.schedule,
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=jobs.c.schedule.isnot(None),
    sqlite_where=jobs.c.schedule.isnot(None),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("worker_host", String(255), nullable=False),
    Column("worker_pid", Integer, nullable=False),
    Column("worker_id", String(64)),  # the `workers` row whose heartbeat says if it still runs
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("duration_ms", Float),
    Column("outcome", String(32)),
    Column("error_type", String(200)),
    Column("error_message", Text),
    Column("traceback", Text),
    # The worker's own mark of this start (`StartRequest.requested_at`): a batch tried again after
    # its reply was lost finds its start committed by this, not as another worker's.
    Column("start_token", Float),
    UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),  # set on a graceful stop, or by the supervisor when it dies
    Index("ix_workers_host_pid", "host", "pid"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("queue", String(200), nullable=False),
    Column("priority", Integer, nullable=False, default=0),  # higher first, as in RabbitMQ
    Column("eta", Float, nullable=False),  # not delivered before this time
    Column("body", LargeBinary, nullable=False),  # the encoded Dramatiq message
    Column("leased_until", Float),  # set while a consumer holds it; expired = redeliver
    Column("lease_owner", String(255)),
    Column("dead_at", Float),  # set when dead-lettered
    Index("ix_messages_due", "queue", "dead_at", "eta"),
    Index("ix_messages_message_id", "message_id"),
)

#: The embedded broker's claim walks this in delivery order (priority, then due time) and stops
#: at the first rows it can take: with only `ix_messages_due`, each claim sorted every due row
#: under the write lock, however long the queue.
claim_order = Index(
    "ix_messages_claim", messages.c.queue, messages.c.dead_at, messages.c.priority.desc(), messages.c.eta, messages.c.id
)

schedules = Table(
    "schedules",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("actor", String(200), nullable=False),
    Column("cron", String(200), nullable=False),
    Column("args", Text, nullable=False),  # JSON
    Column("kwargs", Text, nullable=False),  # JSON
    Column("timezone", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("misfire", String(8), nullable=False),
    Column("misfire_grace_s", Float, nullable=False),
    Column("overlap", Boolean, nullable=False),
    Column("queue", String(200)),
    Column("priority", Integer),
    Column("origin", String(16), nullable=False),  # `api`, `file` or `builtin`: who owns it
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Fires before this are not due: set at creation, at resume and when the timing changes,
    # so that a paused or retimed schedule does not count its old fire times as missed.
    Column("active_since", Float, nullable=False),
)

schedule_fires = Table(
    "schedule_fires",
    metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("schedule", String(100), nullable=False),
    Column("fire_time", Float, nullable=False),  # the cron time, seconds since the epoch
    Column("outcome", String(32), nullable=False),  # `scheduler.ledger.FireOutcome`
    Column("job_id", String(64)),  # the job it created, for `enqueued`
    Column("recorded_at", Float, nullable=False),
    Column("scheduler", String(255), nullable=False),  # host:pid of the scheduler that recorded it
    # The claim: one row per schedule and fire time, whichever scheduler inserts it first.
    UniqueConstraint("schedule", "fire_time", name="uq_schedule_fires_schedule_time"),
)

#: One row: bumped in the transaction of every change of `schedules`, polled by schedulers.
schedule_versions = Table(
    "schedule_versions",
    metadata,
    Column("version", BigInteger, nullable=False),
)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)
