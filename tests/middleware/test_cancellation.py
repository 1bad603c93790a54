"""Cancellation on the StubBroker: waiting jobs never start, running ones are interrupted, the
interrupt never strays into another job, and the worker thread goes on with the next job."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from dramatiq import Message, Middleware, Worker

import engine
from engine import CancelOutcome, JobState, Outcome
from engine.middleware import Tracking
from engine.middleware.cancellation import Cancellation
from engine.settings import Settings
from tests.support.processes import wait_for

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}


@pytest.fixture
def settings(tmp_path) -> Settings:
    # Workers look in the store only every 30 s: a cancel that lands within a second was pushed.
    return Settings(
        store_url=f"sqlite:///{tmp_path}/engine.db", min_backoff_ms=10, max_backoff_ms=50, cancel_check_interval_s=30
    )


@pytest.fixture
def cancellation(stub_broker) -> Cancellation:
    [middleware] = [m for m in stub_broker.middleware if isinstance(m, Cancellation)]
    return middleware


@pytest.fixture
def one_thread(stub_broker):
    """A worker with a single thread: the next job runs on the thread the canceled one had."""
    worker = Worker(stub_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    yield worker
    worker.stop()


def wait_for_state(job_id: str, states: set[JobState], timeout: float = 5.0):
    return wait_for(lambda: (job := engine.get(job_id)).state in states and job, timeout, f"{job_id} in {states}", 0.005)


def cancel_and_measure(job_id: str) -> float:
    """Cancel a running job; seconds from the call to its attempt's end."""
    requested_at = time.time()
    assert engine.cancel(job_id).outcome == CancelOutcome.REQUESTED
    wait_for_state(job_id, FINISHED)
    return engine.attempts(job_id)[-1].finished_at - requested_at


def spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


# -- waiting jobs ---------------------------------------------------------------------------------


def test_a_queued_job_is_canceled_at_once_and_never_starts(stub_broker):
    runs = []

    @engine.actor
    def report():
        runs.append(1)

    job = engine.submit("report")

    canceled = engine.cancel(job.id)

    assert canceled.outcome == CancelOutcome.CANCELED
    assert canceled.job.state == JobState.CANCELED and canceled.job.finished_at is not None
    # when a worker receives its message later
    worker = Worker(stub_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        stub_broker.join("default", fail_fast=True)
        worker.join()
    finally:
        worker.stop()
    assert runs == [] and engine.attempts(job.id) == []
    assert engine.get(job.id).state == JobState.CANCELED
    assert not stub_broker.dead_letters  # skipped and acknowledged, not dead-lettered


def test_a_delayed_job_canceled_before_it_is_due_never_runs(stub_broker, stub_worker):
    runs = []

    @engine.actor
    def reminder():
        runs.append(1)

    job = engine.submit("reminder", delay=0.3)
    assert engine.cancel(job.id).outcome == CancelOutcome.CANCELED
    time.sleep(0.5)
    stub_broker.join("default", fail_fast=False)
    stub_worker.join()

    assert runs == []
    assert engine.get(job.id).state == JobState.CANCELED


def test_a_delayed_job_canceled_before_it_is_due_stays_canceled_without_an_attempt(stub_broker, stub_worker):
    @engine.actor
    def reminder():
        pass

    job = engine.submit("reminder", delay=0.3)
    engine.cancel(job.id)
    states = set()
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        states.add(engine.get(job.id).state)
        time.sleep(0.005)
    stub_broker.join("default", fail_fast=False)
    stub_worker.join()

    assert states == {JobState.CANCELED}
    assert engine.attempts(job.id) == []


def test_cancel_during_a_retry_backoff_ends_the_job_for_good(stub_broker, stub_worker):
    runs = []

    @engine.actor(max_retries=5, min_backoff=1_000, max_backoff=1_000)
    def fetch():
        runs.append(1)
        raise ConnectionError("down")

    job = engine.submit("fetch")
    wait_for_state(job.id, {JobState.SCHEDULED})  # the first attempt failed; waiting 0.5-1 s

    canceled = engine.cancel(job.id)

    assert canceled.outcome == CancelOutcome.CANCELED and canceled.job.state == JobState.CANCELED
    time.sleep(1.5)  # past the backoff: the retry's message has come and gone
    stub_broker.join("default", fail_fast=False)
    stub_worker.join()
    assert runs == [1]
    assert engine.get(job.id).state == JobState.CANCELED
    assert engine.attempts(job.id)[0].outcome == Outcome.WILL_RETRY
    assert len(engine.attempts(job.id)) == 1  # its stale retry message started nothing


# -- running jobs ---------------------------------------------------------------------------------


def test_cancel_interrupts_a_tight_loop_within_a_second_and_never_retries_it(stub_broker, one_thread):
    threads = []

    @engine.actor(max_retries=3, min_backoff=10)
    def crunch():
        threads.append(threading.get_ident())
        spin(10)

    @engine.actor
    def next_job():
        threads.append(threading.get_ident())
        return "done"

    job = engine.submit("crunch")
    wait_for_state(job.id, {JobState.RUNNING})
    time.sleep(0.05)  # well inside the loop

    latency = cancel_and_measure(job.id)

    assert latency < 1.0
    assert engine.get(job.id).state == JobState.CANCELED
    [attempt] = engine.attempts(job.id)
    assert attempt.outcome == Outcome.CANCELED and attempt.error_type == "JobCanceled"
    # the same thread takes the next job; the canceled one is not retried
    following = engine.submit("next_job")
    assert wait_for_state(following.id, FINISHED).state == JobState.SUCCEEDED
    stub_broker.join("default", fail_fast=False)
    assert len(threads) == 2 and threads[0] == threads[1]
    assert len(engine.attempts(job.id)) == 1 and engine.get(job.id).state == JobState.CANCELED


def test_cancel_stops_cooperative_code_and_except_exception_does_not_swallow_it(stub_broker, stub_worker):
    swallowed = []

    @engine.actor(max_retries=3)
    def import_rows():
        for row in range(100_000):
            try:
                engine.progress(row / 1000, f"row {row}")
                engine.cancel_requested()
                time.sleep(0.01)
            except Exception as error:  # user code that "handles" every error
                swallowed.append(error)
        return "imported"

    job = engine.submit("import_rows")
    wait_for(lambda: engine.get(job.id).progress_percent, 5.0, "progress", 0.005)

    latency = cancel_and_measure(job.id)

    assert latency < 1.0 and swallowed == []
    assert engine.get(job.id).state == JobState.CANCELED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]


def test_cancel_requested_stops_code_that_swallowed_the_interrupt(stub_broker, stub_worker):
    @engine.actor
    def stubborn():
        while True:
            try:
                spin(0.01)
            except BaseException:  # a bare `except:` eats the interrupt...
                pass
            engine.cancel_requested()  # ...and the checkpoint stops it anyway

    job = engine.submit("stubborn")
    wait_for_state(job.id, {JobState.RUNNING})

    # Without the checkpoint, the thread would be interrupted again only after 30 s.
    assert cancel_and_measure(job.id) < 1.0
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]


def test_cancel_requested_outside_a_job_is_false(stub_broker):
    assert engine.cancel_requested() is False


def test_a_cancel_missed_by_the_push_is_found_in_the_store(stub_broker, cancellation, monkeypatch):
    monkeypatch.setattr(Cancellation, "broadcast", lambda self, job_id: None)  # the push is lost
    cancellation.check_interval_s = 0.2
    worker = Worker(stub_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:

        @engine.actor
        def crunch():
            spin(10)

        job = engine.submit("crunch")
        wait_for_state(job.id, {JobState.RUNNING})

        assert cancel_and_measure(job.id) < 0.2 + 0.5
        assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]
    finally:
        worker.stop()


def test_a_cancel_right_after_the_start_is_not_missed(stub_broker, stub_worker):
    """A request committed after Tracking made the job `running`, before its code runs: the
    job was registered before its start, so the push finds it (the store is looked at only
    every 30 s here)."""
    runs = []

    class CancelRightAfterTracking(Middleware):
        def before_process_message(self, broker, message):
            assert engine.cancel(message.message_id).outcome == CancelOutcome.REQUESTED

    @engine.actor
    def report():
        runs.append(1)
        spin(10)

    tracking_index = next(i for i, m in enumerate(stub_broker.middleware) if isinstance(m, Tracking))
    stub_broker.middleware.insert(tracking_index + 1, CancelRightAfterTracking())
    job = engine.submit("report")

    assert wait_for_state(job.id, FINISHED, timeout=2).state == JobState.CANCELED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]


def test_a_redelivered_job_whose_cancel_was_requested_stops_before_its_code(stub_broker, stub_worker, store):
    """The job's first worker died while it ran, after its cancel was requested: the start of
    its redelivery reads the request, and the code is never entered."""
    runs = []

    @engine.actor
    def report():
        runs.append(1)

    job = engine.submit("report", delay=60)  # not due: only the redelivery below runs it
    store.start_attempt(job.id, host="gone", pid=1, worker_id="dead-worker", dead_after_s=10)
    assert store.request_cancel(job.id).state == JobState.RUNNING
    stub_broker.enqueue(Message(queue_name="default", actor_name="report", args=(), kwargs={}, options={}, message_id=job.id))

    assert wait_for_state(job.id, FINISHED, timeout=2).state == JobState.CANCELED
    assert runs == []
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.ABANDONED, Outcome.CANCELED]


# -- answers --------------------------------------------------------------------------------------


def test_cancel_twice_a_finished_job_and_an_unknown_id(stub_broker, stub_worker):
    @engine.actor
    def crunch():
        spin(10)

    @engine.actor
    def add(x, y):
        return x + y

    running = engine.submit("crunch")
    wait_for_state(running.id, {JobState.RUNNING})
    first, second = engine.cancel(running.id), engine.cancel(running.id)
    assert first.outcome == CancelOutcome.REQUESTED and first.job.state == JobState.RUNNING
    assert second.outcome in (CancelOutcome.REQUESTED, CancelOutcome.CANCELED)
    wait_for_state(running.id, FINISHED)
    again = engine.cancel(running.id)
    assert again.outcome == CancelOutcome.CANCELED and again.job.state == JobState.CANCELED
    assert len(engine.attempts(running.id)) == 1

    done = engine.submit("add", 2, 3)
    finished = wait_for_state(done.id, FINISHED)
    answer = engine.cancel(done.id)
    assert answer.outcome == CancelOutcome.ALREADY_FINISHED
    assert answer.job == finished and engine.result(done.id) == 5  # untouched

    with pytest.raises(engine.JobNotFound):
        engine.cancel("no-such-id")


def test_a_canceled_job_retried_by_hand_runs_again(stub_broker, stub_worker):
    calls = []

    @engine.actor
    def crunch(seconds):
        calls.append(1)
        if len(calls) == 1:
            spin(seconds)
        return "done"

    job = engine.submit("crunch", 10)
    wait_for_state(job.id, {JobState.RUNNING})
    cancel_and_measure(job.id)

    engine.retry(job.id)  # the old cancel request must not cancel the new run

    assert wait_for_state(job.id, FINISHED).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED, Outcome.SUCCEEDED]


# -- the interrupt never strays -------------------------------------------------------------------


class _JobThread(threading.Thread):
    """A worker thread stand-in: runs one job through the middleware's hooks and its wrapped
    code, and stops at `pause_at` ("before-code", "in-code" or "after-code") blocked in C, on a
    lock, where an interrupt raised meanwhile stays pending until it runs Python again. Then it
    runs some Python and records what happened."""

    def __init__(self, cancellation: Cancellation, pause_at: str) -> None:
        super().__init__(daemon=True)
        self.cancellation, self.pause_at = cancellation, pause_at
        self.paused = threading.Event()
        self.gate = threading.Lock()
        self.gate.acquire()
        self.code_ran = False
        self.outcome = None

    def pause(self, where: str) -> None:
        if where == self.pause_at:
            self.paused.set()
            self.gate.acquire()  # blocked in C until the test releases it

    def code(self) -> None:
        self.code_ran = True
        self.pause("in-code")
        spin(0.1)

    def run(self) -> None:
        message = SimpleNamespace(message_id="job-1")
        try:
            self.cancellation.before_process_message(None, message)
            self.pause("before-code")
            self.cancellation._interruptible(self.code)()
            self.pause("after-code")  # e.g. Tracking recording the end: no interrupt may land here
            spin(0.1)
            self.outcome = "untouched"
        except engine.JobCanceled:
            self.outcome = "interrupted"
        finally:
            self.cancellation.after_process_message(None, message)

    def resume(self) -> None:
        self.gate.release()
        self.join()


def test_an_interrupt_is_raised_only_while_the_thread_runs_the_jobs_code(cancellation):
    thread = _JobThread(cancellation, pause_at="after-code")
    thread.start()
    thread.paused.wait()

    # the job is still this process's (its end is being recorded), its code has returned
    assert cancellation.interrupt("job-1") is True

    thread.resume()
    assert thread.outcome == "untouched"
    assert cancellation.interrupt("job-1") is False  # the job has ended


def test_an_interrupt_still_pending_when_the_code_returns_is_withdrawn(cancellation):
    thread = _JobThread(cancellation, pause_at="in-code")
    thread.start()
    thread.paused.wait()

    # given an interrupt raised while the code ran, not yet delivered (the thread is in C)
    assert cancellation.interrupt("job-1") is True
    # when the code returns first (here, as if it had returned just before the interrupt came)
    cancellation._disarm(thread.ident)

    thread.resume()
    assert thread.outcome == "untouched"


def test_an_interrupt_raised_while_the_code_runs_is_delivered(cancellation):
    """The control for the two tests above."""
    thread = _JobThread(cancellation, pause_at="in-code")
    thread.start()
    thread.paused.wait()

    cancellation.interrupt("job-1")

    thread.resume()
    assert thread.outcome == "interrupted"


def test_a_cancel_pushed_before_the_code_starts_stops_it_on_entry(cancellation):
    thread = _JobThread(cancellation, pause_at="before-code")
    thread.start()
    thread.paused.wait()

    cancellation.interrupt("job-1")

    thread.resume()
    assert thread.outcome == "interrupted" and thread.code_ran is False


def test_cancels_racing_the_end_of_jobs_never_disturb_the_worker(stub_broker, one_thread):
    """Cancels landing at every moment of short jobs (before, during, just after their code):
    each job ends `succeeded` or `canceled` with one matching attempt, never retried, and the
    worker thread survives to run the next job."""

    @engine.actor(max_retries=3, min_backoff=10)
    def short(seconds):
        time.sleep(seconds)  # the GIL free for the cancellers: their cancels land at any moment
        spin(0.001)
        return "done"

    stop = threading.Event()

    def cancel_whatever_runs():
        while not stop.is_set():
            for job in engine.jobs(status="running", limit=5).jobs:
                engine.cancel(job.id)

    jobs = [engine.submit("short", 0.001 * (i % 20)) for i in range(200)]
    cancellers = [threading.Thread(target=cancel_whatever_runs) for _ in range(2)]
    for canceller in cancellers:
        canceller.start()
    try:
        for job in jobs:
            wait_for_state(job.id, FINISHED, timeout=20)
    finally:
        stop.set()
        for canceller in cancellers:
            canceller.join()

    states = {job.id: engine.get(job.id).state for job in jobs}
    for job in jobs:
        [attempt] = engine.attempts(job.id)
        expected = Outcome.CANCELED if states[job.id] == JobState.CANCELED else Outcome.SUCCEEDED
        assert attempt.outcome == expected
    assert {JobState.SUCCEEDED, JobState.CANCELED} <= set(states.values())  # the race was run
    last = engine.submit("short", 0)
    assert wait_for_state(last.id, FINISHED).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(last.id)] == [Outcome.SUCCEEDED]
