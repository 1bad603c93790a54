"""The API's operations: each route's handler, on the engine's Python API (`engine.client`).

The handlers take validated models and return models; turning errors into answers (a missing
job into 404, a store that is down into 503) is the server's (`api.server`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from prometheus_client.exposition import generate_latest
from sqlalchemy.exc import DBAPIError

import engine
from engine import client
from engine.app import get_broker, get_store
from engine.errors import EngineError
from engine.job import JobState
from engine.metrics.cluster import ClusterCollector
from engine.metrics.host import EXPOSITION_MEDIA_TYPE, own_metrics, registry_of
from engine.settings import Settings
from engine.store import decode_cursor
from scheduler.definition import ScheduleNotFound

from . import models as m
from .routing import RETRY_AFTER_S, ApiError, Reply, Request, Route, first_line

#: Workers heard from within this many seconds are listed, dead or alive.
WORKERS_RECENT_S = 3600.0

class Endpoints:
    """The handlers, with the settings some of them read (retry defaults, worker liveness), and
    the cluster's metrics (`engine.metrics.cluster`).

    Parameters:
      settings(Settings): the engine's settings.
      page(Callable[[], str]): the status page's HTML.
      openapi(Callable[[], dict]): the OpenAPI description.
    """

    def __init__(self, settings: Settings, *, page: Callable[[], str], openapi: Callable[[], dict[str, Any]]) -> None:
        self.settings = settings
        self._page = page
        self._openapi = openapi
        cluster = ClusterCollector(
            store=get_store, queue_depths=client.queue_depths,
            dead_after_s=settings.worker_dead_after_s, timeout_s=settings.metrics_scrape_timeout_s,
        )  # fmt: skip
        # Alone (`engine api`), the jobs this process enqueued are served here; under `engine
        # run`, by the host's supervisor.
        self._metrics = registry_of(cluster, *own_metrics())

    def routes(self) -> list[Route]:
        """Every operation of the API, as the router and the OpenAPI description see them."""
        return [
            Route("POST", "/api/jobs", self.submit, "Submit a job", m.JobOut, status=202, body=m.JobSubmission,
                  also=((200, "the idempotency key's first job: nothing was enqueued", m.JobOut),)),
            Route("GET", "/api/jobs", self.list_jobs, "List jobs, newest first", m.JobPage, query=m.JobQuery),
            Route("POST", "/api/jobs/bulk-retry", self.bulk_retry, "Retry the failed jobs that match a filter",
                  m.BulkRetryOut, body=m.BulkRetry),
            Route("GET", "/api/jobs/{job_id}", self.get_job, "A job", m.JobOut),
            Route("GET", "/api/jobs/{job_id}/result", self.get_result, "A succeeded job's result", m.JobResult,
                  errors=(409,)),
            Route("GET", "/api/jobs/{job_id}/attempts", self.get_attempts, "A job's attempts", m.AttemptList),
            Route("POST", "/api/jobs/{job_id}/cancel", self.cancel, "Cancel a job", m.CancelOut),
            Route("POST", "/api/jobs/{job_id}/retry", self.retry, "Requeue a failed or canceled job", m.JobOut,
                  status=202, errors=(409,)),
            Route("GET", "/api/actors", self.actors, "Job types and their settings", m.ActorList, tag="engine"),
            Route("GET", "/api/queues", self.queues, "Queue depths", m.QueueList, tag="engine"),
            Route("GET", "/api/workers", self.workers, "Worker processes, live and recently dead", m.WorkerList,
                  tag="engine"),
            Route("GET", "/api/overview", self.overview, "Counts by state, queues and workers at a glance",
                  m.Overview, tag="engine"),
            Route("GET", "/api/schedules", self.list_schedules, "Cron schedules", m.ScheduleList, tag="schedules"),
            Route("POST", "/api/schedules", self.create_schedule, "Create a cron schedule", m.ScheduleOut, status=201,
                  body=m.ScheduleIn, errors=(409,), tag="schedules"),
            Route("GET", "/api/schedules/{name}", self.get_schedule, "A schedule", m.ScheduleOut, tag="schedules"),
            Route("PATCH", "/api/schedules/{name}", self.change_schedule, "Change, pause or resume a schedule",
                  m.ScheduleOut, body=m.ScheduleChange, tag="schedules"),
            Route("DELETE", "/api/schedules/{name}", self.delete_schedule, "Delete a schedule (its jobs stay)", None,
                  status=204, media_type="", tag="schedules"),
            Route("POST", "/api/schedules/{name}/run", self.run_schedule, "Create the schedule's job now", m.JobOut,
                  status=202, tag="schedules"),
            Route("GET", "/api/schedules/{name}/fires", self.schedule_fires, "A schedule's fire ledger", m.FireList,
                  query=m.FireQuery, tag="schedules"),
            Route("GET", "/api/schedules/{name}/preview", self.preview_schedule, "A schedule's next fire times",
                  m.Preview, query=m.PreviewQuery, tag="schedules"),
            Route("GET", "/healthz", self.health, "Liveness", m.Health, tag="health"),
            Route("GET", "/readyz", self.ready, "Readiness: the store and the broker answer", m.Readiness, tag="health"),
            Route("GET", "/metrics", self.metrics, "The cluster's metrics, for Prometheus", None,
                  media_type=EXPOSITION_MEDIA_TYPE, tag="health"),
            Route("GET", "/openapi.json", self.openapi, "This description", m.OpenApiDocument, tag="health"),
            Route("GET", "/", self.page, "The status page", None, media_type="text/html", tag="page"),
        ]  # fmt: skip

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Reply:
        body: m.JobSubmission = request.body
        delay = None if body.delay_ms is None else body.delay_ms / 1000
        job, created = client.submit_call(
            body.actor, body.args, body.kwargs,
            idempotency_key=body.idempotency_key, delay=delay, priority=body.priority,
        )  # fmt: skip
        headers = {"Location": f"/api/jobs/{job.id}"}
        return Reply(m.JobOut.of(job), 202 if created else 200, headers)

    def list_jobs(self, request: Request) -> m.JobPage:
        query: m.JobQuery = request.query
        _check_cursor(query.cursor)
        page, next_cursor = get_store().list_jobs(
            state=query.status, actor=query.actor, queue=query.queue, schedule=query.schedule, limit=query.limit,
            cursor=query.cursor,
            created_since=_epoch(query.created_after), created_before=_epoch(query.created_before),
        )  # fmt: skip
        return m.JobPage(jobs=[m.JobOut.of(job) for job in page], next_cursor=next_cursor)

    def get_job(self, request: Request) -> m.JobOut:
        return m.JobOut.of(client.get(request.params["job_id"]))

    def get_result(self, request: Request) -> m.JobResult:
        job_id = request.params["job_id"]
        return m.JobResult(job_id=job_id, result=client.result(job_id))

    def get_attempts(self, request: Request) -> m.AttemptList:
        job_id = request.params["job_id"]
        return m.AttemptList(job_id=job_id, attempts=[m.AttemptOut.of(attempt) for attempt in client.attempts(job_id)])

    def cancel(self, request: Request) -> m.CancelOut:
        done = client.cancel(request.params["job_id"])
        return m.CancelOut(outcome=done.outcome, job=m.JobOut.of(done.job))

    def retry(self, request: Request) -> Reply:
        job = client.retry(request.params["job_id"])
        return Reply(m.JobOut.of(job), 202, {"Location": f"/api/jobs/{job.id}"})

    def bulk_retry(self, request: Request) -> m.BulkRetryOut:
        body: m.BulkRetry = request.body
        page, more = get_store().list_jobs(
            state=JobState(body.status), actor=body.actor, queue=body.queue, schedule=body.schedule, limit=body.limit,
            created_since=_epoch(body.created_after), created_before=_epoch(body.created_before),
        )  # fmt: skip
        retried, failures = [], []
        for job in page:
            try:
                client.retry(job.id)
            except (EngineError, DBAPIError) as error:  # another request retried it, the store blinked
                failures.append(m.RetryFailure(job_id=job.id, message=str(error).splitlines()[0]))
            else:
                retried.append(job.id)
        return m.BulkRetryOut(retried=retried, failures=failures, more=more is not None)

    # -- the engine ------------------------------------------------------------------------------

    def actors(self, request: Request) -> m.ActorList:
        broker, settings = get_broker(), self.settings
        found = []
        for name in sorted(broker.get_declared_actors()):
            actor = broker.get_actor(name)
            options = actor.options
            found.append(m.ActorOut(
                name=name, queue=actor.queue_name, priority=actor.priority,
                max_retries=options.get("max_retries", settings.max_retries),
                min_backoff_ms=options.get("min_backoff", settings.min_backoff_ms),
                max_backoff_ms=options.get("max_backoff", settings.max_backoff_ms),
                time_limit_ms=options.get("time_limit", settings.time_limit_ms),
            ))  # fmt: skip
        return m.ActorList(actors=found)

    def queues(self, request: Request) -> m.QueueList:
        return m.QueueList(queues=_queues(client.queue_depths()))

    def workers(self, request: Request) -> m.WorkerList:
        now = time.time()
        found = get_store().list_workers(seen_since=now - WORKERS_RECENT_S)
        dead_after_s = self.settings.worker_dead_after_s
        return m.WorkerList(workers=[m.WorkerOut.of(worker, now=now, dead_after_s=dead_after_s) for worker in found])

    def overview(self, request: Request) -> m.Overview:
        store, now = get_store(), time.time()
        try:
            queues: Optional[list[m.QueueOut]] = _queues(client.queue_depths())
        except Exception:  # noqa: BLE001  (the page still shows the store's side; /readyz says why)
            queues = None
        dead_after_s = self.settings.worker_dead_after_s
        workers = store.list_workers(seen_since=now - dead_after_s)
        return m.Overview(
            jobs=m.StateCounts(**store.count_by_state()),
            last_hour=m.StateCounts(**store.count_by_state(created_since=now - 3600)),
            queues=queues,
            workers_alive=sum(worker.alive(now=now, dead_after_s=dead_after_s) for worker in workers),
        )

    # -- schedules -------------------------------------------------------------------------------

    def list_schedules(self, request: Request) -> m.ScheduleList:
        return m.ScheduleList(schedules=[m.ScheduleOut.of(info) for info in engine.list_schedules()])

    def create_schedule(self, request: Request) -> Reply:
        body: m.ScheduleIn = request.body
        try:
            engine.get_schedule(body.name)
        except ScheduleNotFound:
            pass
        else:
            raise ApiError(409, "schedule_exists", f"a schedule named {body.name!r} exists; PATCH it to change it")
        info = engine.set_schedule(**body.model_dump())
        return Reply(m.ScheduleOut.of(info), 201, {"Location": f"/api/schedules/{body.name}"})

    def get_schedule(self, request: Request) -> m.ScheduleOut:
        return m.ScheduleOut.of(engine.get_schedule(request.params["name"]))

    def change_schedule(self, request: Request) -> m.ScheduleOut:
        name, change = request.params["name"], request.body.model_dump(exclude_unset=True)
        if set(change) == {"enabled"}:  # pause or resume: the schedule keeps its owner
            done = engine.resume_schedule(name) if change["enabled"] else engine.pause_schedule(name)
            return m.ScheduleOut.of(done)
        current = engine.get_schedule(name).schedule.model_dump()
        return m.ScheduleOut.of(engine.set_schedule(**{**current, **change}))

    def delete_schedule(self, request: Request) -> Reply:
        engine.delete_schedule(request.params["name"])
        return Reply(b"", 204)

    def run_schedule(self, request: Request) -> Reply:
        job = engine.run_schedule(request.params["name"])
        return Reply(m.JobOut.of(job), 202, {"Location": f"/api/jobs/{job.id}"})

    def schedule_fires(self, request: Request) -> m.FireList:
        name = request.params["name"]
        fires = engine.schedule_fires(name, limit=request.query.limit)
        return m.FireList(schedule=name, fires=[m.FireOut.of(fire) for fire in fires])

    def preview_schedule(self, request: Request) -> m.Preview:
        name = request.params["name"]
        return m.Preview(schedule=name, fire_times=engine.preview_schedule(name, request.query.count))

    # -- health, the description, the page -------------------------------------------------------

    def health(self, request: Request) -> m.Health:
        return m.Health()

    def ready(self, request: Request) -> m.Readiness:
        unavailable = {"Retry-After": str(RETRY_AFTER_S)}
        try:
            get_store().ping()
        except Exception as error:  # noqa: BLE001
            raise ApiError(503, "store_unavailable", f"the job store cannot be reached: {first_line(error)}", headers=unavailable) from None
        try:
            client.queue_depths()
        except Exception as error:  # noqa: BLE001
            raise ApiError(503, "broker_unavailable", f"the broker cannot be reached: {first_line(error)}", headers=unavailable) from None
        return m.Readiness()

    def metrics(self, request: Request) -> Reply:
        """Read at each scrape; never an error: what the store or broker did not answer is
        left out, with ``engine_up`` 0 (see `engine.metrics.cluster`)."""
        return Reply(generate_latest(self._metrics))

    def openapi(self, request: Request) -> Reply:
        return Reply(m.OpenApiDocument.model_validate(self._openapi()))

    def page(self, request: Request) -> Reply:
        return Reply(self._page())


def _queues(depths: dict[str, dict[str, int]]) -> list[m.QueueOut]:
    return [
        m.QueueOut(name=name, ready=kinds.get("ready", 0), delayed=kinds.get("delayed", 0), dead=kinds.get("dead", 0),
                   running=kinds.get("running"))  # fmt: skip
        for name, kinds in sorted(depths.items())
    ]


def _check_cursor(cursor: Optional[str]) -> None:
    if cursor is None:
        return
    try:
        decode_cursor(cursor)
    except EngineError as error:
        raise ApiError(422, "invalid_fields", str(error), fields=[("cursor", str(error))]) from None


def _epoch(value: Any) -> Optional[float]:
    return None if value is None else value.timestamp()
