"""Group commit: writes from many threads committed together, in order, each told its own
outcome; a database outage waited out by the writes that are to wait it out, and only those."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from engine.writer import BatchThread, GroupCommit, Pending, wait_all


@pytest.fixture
def writer(store):
    with store.transaction() as connection:
        connection.execute(text("CREATE TABLE notes (n INTEGER PRIMARY KEY)"))
    writer = GroupCommit(store.connect_for_writes)
    yield writer
    writer.close()


class Notes:
    """A kind of write: inserts its items as rows of `notes`, and remembers each batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, connection: Connection, items: list[int]) -> list[int]:
        self.batches.append(items)
        for n in items:
            connection.execute(text("INSERT INTO notes (n) VALUES (:n)"), {"n": n})
        return [n * 10 for n in items]


def notes(store) -> list[int]:
    with store.reading() as connection:
        return list(connection.execute(text("SELECT n FROM notes ORDER BY n")).scalars())


def test_writes_of_many_threads_share_transactions_and_each_gets_its_result(store, writer):
    apply = Notes()
    results: dict[int, int] = {}

    def write(n: int) -> None:
        results[n] = writer.write(apply, n)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == {n: n * 10 for n in range(200)}
    assert notes(store) == list(range(200))
    assert len(apply.batches) < 200  # some were committed together
    assert max(len(batch) for batch in apply.batches) > 1


def test_writes_are_committed_in_the_order_they_were_handed_in(store, writer):
    apply = Notes()

    pending = [writer.submit(apply, n) for n in range(50)]
    writer.flush()

    assert all(each.done() for each in pending)
    assert [n for batch in apply.batches for n in batch] == list(range(50))


def test_a_failing_write_fails_alone_and_its_batch_is_committed_without_it(store, writer):
    apply = Notes()
    pending = [writer.submit(apply, n) for n in (1, 2, 2, 3)]  # the second 2 breaks the primary key

    writer.flush()

    outcomes = [each.exception() for each in pending]
    assert [error is None for error in outcomes] == [True, True, False, True]
    assert notes(store) == [1, 2, 3]


def test_a_write_that_waits_out_outages_does_and_another_fails(store, writer, monkeypatch):
    monkeypatch.setattr("engine.writer.OUTAGE_MAX_PAUSE_S", 0.05)
    down = {"left": 3}

    def flaky(connection: Connection, items: list[str]) -> list[str]:
        if down["left"]:
            down["left"] -= 1
            raise OperationalError("INSERT", {}, Exception("the database is down"))
        return items

    failing = writer.submit(flaky, "now", wait_out_outage=False)
    waiting = writer.submit(flaky, "whenever")

    assert waiting.result(timeout=5) == "whenever"
    assert isinstance(failing.exception(), OperationalError)


def test_a_pending_write_runs_its_callbacks_once_whenever_they_are_added():
    pending: Pending[int] = Pending()
    calls: list[int] = []
    pending.add_done_callback(lambda done: calls.append(done.result()))

    pending.set_result(7)
    pending.add_done_callback(lambda done: calls.append(done.result() + 1))

    assert calls == [7, 8]
    assert wait_all([pending], timeout=0)
    with pytest.raises(TimeoutError):
        Pending().result(timeout=0.01)


class Batches:
    """A `BatchThread` handler that remembers each batch and when it came."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[int]]] = []
        self.handled = threading.Event()

    def __call__(self, batch: list[int]) -> None:
        self.batches.append((time.monotonic(), batch))
        self.handled.set()

    def close(self) -> None:
        pass


def put_spaced(thread: BatchThread[int], items: range, spacing_s: float) -> None:
    for n in items:
        thread.put(n)
        time.sleep(spacing_s)


def test_items_that_follow_closely_join_the_batch_of_the_first():
    handler = Batches()
    thread = BatchThread("gather", lambda: handler, max_batch=100, gather_gap_s=0.5, gather_max_s=10)

    put_spaced(thread, range(5), 0.02)
    thread.close(timeout_s=5)

    assert [batch for _, batch in handler.batches] == [[0, 1, 2, 3, 4]]


def test_a_lone_item_waits_one_gap_and_a_stream_is_cut_at_the_longest_gathering():
    handler = Batches()
    lone = BatchThread("gather", lambda: handler, max_batch=100, gather_gap_s=0.05, gather_max_s=30)
    put_at = time.monotonic()
    lone.put(1)
    assert handler.handled.wait(timeout=5)
    assert handler.batches[0][0] - put_at < 5  # the gap, not the 30 s of gathering
    lone.close(timeout_s=5)

    stream = Batches()
    thread = BatchThread("gather", lambda: stream, max_batch=100, gather_gap_s=5, gather_max_s=0.2)
    put_spaced(thread, range(20), 0.05)  # one second of items, each well within the gap
    thread.close(timeout_s=10)

    assert [n for _, batch in stream.batches for n in batch] == list(range(20))
    assert len(stream.batches) >= 2


def test_the_batch_after_one_that_announced_next_items_waits_for_them():
    handler = Batches()
    # No gap: without items announced, each item spaced out below would be a batch of its own.
    thread = BatchThread(
        "gather", lambda: handler, max_batch=100, gather_max_s=10, next_items=lambda n: 2 if n == 0 else 0
    )
    thread.put(0)
    assert handler.handled.wait(timeout=5)

    put_spaced(thread, range(1, 3), 0.05)  # the two items 0 announced
    thread.put(3)  # comes alone: 1 and 2 announced none
    thread.close(timeout_s=5)

    assert [batch for _, batch in handler.batches] == [[0], [1, 2], [3]]
