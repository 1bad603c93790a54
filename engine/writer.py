"""Group commit: the store writes of a process's threads, committed together.

Each job costs its worker two writes that must be durable before it goes on: the job may not
run before it is `running`, and its message may not be acknowledged before its end is
recorded. Committed one by one, that is a transaction per write, each with its own round trips
and its own flush to disk (on SQLite, under the database's one write lock). Here a single
writer thread per process takes every write that is waiting, applies them in one transaction
(one statement per kind of write, for the whole batch), commits once, and wakes the threads
that wait for them. A batch that is one statement is committed by it, without a transaction
around it (see `GroupCommit`).

A batch is the writes waiting when the writer is free, and those that come right after them.
Each commit costs the database about the same whatever its size (the statement, the flush of
its log), and the writes of a busy process come in bursts: the threads that one commit
releases each end their job and ask to start the next. Taking only what was waiting, the
writer would take the first of them alone, and the threads would run as two half-sized
groups, one committed while the other runs. So a write can say how many writes its caller
will hand in once it is committed (a job's start: the job's end and the next start), and the
batch after it waits for them, for `GATHER_MAX_S` at most; otherwise a batch takes the writes
that come within `GATHER_GAP_S` of the last. A lone write waits one gap; a write that comes
while a batch is being committed goes into the next one.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable, Generic, NamedTuple, Optional, Protocol, TypeVar

from loguru import logger
from sqlalchemy import Connection
from sqlalchemy.exc import InterfaceError, OperationalError

from .backoff import Backoff

T = TypeVar("T")
R = TypeVar("R")

#: Applies a batch of items of one kind in an open transaction; one result per item, in order.
Apply = Callable[[Connection, list[T]], list[R]]

#: The most writes committed in one transaction.
MAX_BATCH = 512

#: A write that comes within this many seconds of the last one taken joins its batch ...
GATHER_GAP_S = 100e-6

#: ... until the batch has gathered for this long: then it is committed (see the module's doc).
GATHER_MAX_S = 1e-3

#: How often a put waiting for room in a full BatchThread looks again (it is woken sooner when
#: a batch is taken).
ROOM_POLL_S = 0.05

#: The first and the longest pause between two tries of a batch while the database is unreachable.
OUTAGE_FIRST_PAUSE_S = 0.1
OUTAGE_MAX_PAUSE_S = 5.0

#: Errors that mean the database cannot be reached (or is locked), not that a write is wrong.
OUTAGE_ERRORS = (OperationalError, InterfaceError)


#: This process's id, kept up to date across forks: threads started before a fork are gone in
#: the child, and comparing with it (unlike calling ``os.getpid()``) costs no system call.
current_pid = os.getpid()


def _forked() -> None:
    global current_pid
    current_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class Pending(Generic[R]):
    """The outcome of a write another thread does: `concurrent.futures.Future`'s interface
    (``result``, ``exception``, ``done``, ``add_done_callback``, and their ``timeout`` in
    seconds), on one lock and no condition variable, since a job makes two or three of them.

    Callbacks run on the thread that settles it, or at once if it is settled already.
    """

    __slots__ = ("_lock", "_settled", "_value", "_error", "_callbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # released when settled
        self._settled = False
        self._value: Optional[R] = None
        self._error: Optional[BaseException] = None
        self._callbacks: list[Callable[[Pending[R]], object]] = []

    def done(self) -> bool:
        return self._settled

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until it is settled; False if `timeout` seconds passed first."""
        if not self._settled:
            if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                return False
            self._lock.release()  # for the other waiters
        return True

    def result(self, timeout: Optional[float] = None) -> R:
        """Its value, once settled. Raises: its error; TimeoutError."""
        if not self.wait(timeout):
            raise TimeoutError("the write is still pending")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def exception(self) -> Optional[BaseException]:
        """Its error once settled (None if it succeeded)."""
        self.wait()
        return self._error

    def add_done_callback(self, callback: Callable[[Pending[R]], object]) -> None:
        self._callbacks.append(callback)
        if self._settled:
            self._run_callbacks()

    def set_result(self, value: R) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Optional[R], error: Optional[BaseException]) -> None:
        self._value, self._error = value, error
        self._settled = True
        self._lock.release()
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        # pop: each callback runs once, on whichever thread takes it first.
        while self._callbacks:
            try:
                callback = self._callbacks.pop(0)
            except IndexError:
                return
            try:
                callback(self)
            except Exception:
                logger.exception("A callback of a store write failed.")


def wait_all(pending: list[Pending[Any]], timeout: Optional[float] = None) -> bool:
    """Wait until each is settled; False if `timeout` seconds passed first (as
    `concurrent.futures.wait`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return all(each.wait(None if deadline is None else deadline - time.monotonic()) for each in pending)


class BatchHandler(Protocol[T]):
    """What a `BatchThread` runs, with the state of its thread (a connection, say)."""

    def __call__(self, batch: list[T]) -> None: ...

    def close(self) -> None: ...


class BatchThread(Generic[T]):
    """A thread of its own that takes the items handed to it in batches: each batch is every
    item waiting when the last one was done, up to `max_batch`. It starts on first use (again
    in a forked child, which has no thread), and `close` lets it finish what it was handed.

    Parameters:
      name(str): the thread's name.
      handler: makes, in the new thread, what handles its batches (and is closed when it stops).
      max_batch(int): the most items in one batch.
      capacity(int): the most items waiting; `put` blocks while that many are (0: no bound).
      gather_gap_s(float): a batch also takes the items that come within this many seconds of
        the last one it took (0: only those waiting) ...
      gather_max_s(float): ... for this many seconds at most after its first.
      next_items: how many items handling an item brings soon (its thread, released, hands in
        its next ones). The batch after one whose items announced some waits for them instead
        of a gap, for `gather_max_s` at most.
    """

    def __init__(
        self,
        name: str,
        handler: Callable[[], BatchHandler[T]],
        *,
        max_batch: int,
        capacity: int = 0,
        gather_gap_s: float = 0.0,
        gather_max_s: float = 0.0,
        next_items: Optional[Callable[[T], int]] = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.max_batch = max_batch
        self.capacity = capacity
        self.gather_gap_s = gather_gap_s
        self.gather_max_s = gather_max_s
        self.next_items = next_items
        self._awaited = 0  # how many items the next batch waits for (see `_expect_next_items`)
        # SimpleQueue's put and get are C code under the GIL, without the Python-level locks
        # of queue.Queue: those made senders and the thread convoy on each other.
        self._items: queue.SimpleQueue[Optional[T]] = queue.SimpleQueue()
        self._room = threading.Event()  # set when a batch is taken, for a put waiting for room
        self._thread: Optional[threading.Thread] = None
        self._pid = 0
        self._lock = threading.Lock()

    def put(self, item: T) -> None:
        self._ensure_thread()
        while self.capacity and self._items.qsize() >= self.capacity:
            self._room.clear()
            if self._items.qsize() >= self.capacity:
                self._room.wait(ROOM_POLL_S)
        self._items.put(item)

    def waiting(self) -> int:
        """How many items wait to be taken."""
        return self._items.qsize()

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Handle what was handed in, then stop the thread (a later `put` starts a new one).

        Parameters:
          timeout_s(float): seconds to wait at most; what is left is lost with the process.
        """
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._items.put(None)
            thread.join(timeout_s)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == current_pid:
            return
        with self._lock:
            if self._thread is None or self._pid != current_pid:
                self._pid = current_pid
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        handle = self.handler()
        try:
            while True:
                first = self._items.get()
                if first is None:
                    return
                batch = self._gather(first)
                self._room.set()
                handle(batch)
                self._expect_next_items(batch)
        finally:
            handle.close()

    def _expect_next_items(self, batch: list[T]) -> None:
        """After `batch`: the next batch is to wait for the items waiting now and the items
        `batch` announced (`next_items`), if it announced any."""
        expected = sum(map(self.next_items, batch)) if self.next_items is not None else 0
        self._awaited = self._items.qsize() + expected if expected else 0

    def _gather(self, first: T) -> list[T]:
        """`first`, the items waiting behind it, and those that come next: the items the last
        batch announced if it did (`next_items`), else those that come closely (`gather_gap_s`)."""
        batch = [first]
        until = time.monotonic() + self.gather_max_s
        while len(batch) < self.max_batch:
            try:
                more = self._items.get_nowait()
            except queue.Empty:
                left_s = until - time.monotonic()
                if self._awaited:
                    wait_s = left_s if len(batch) < self._awaited else 0.0
                else:
                    wait_s = min(self.gather_gap_s, left_s)
                if wait_s <= 0:
                    break
                try:
                    more = self._items.get(timeout=wait_s)
                except queue.Empty:
                    break
            if more is None:
                self._items.put(None)  # for the next get: stop after this batch
                break
            batch.append(more)
        return batch


class _Write(NamedTuple):
    apply: Apply[Any, Any]
    item: Any
    waits_out_outage: bool
    future: Pending[Any]
    next_writes: int


class GroupCommit:
    """The writer thread of one process, for one database.

    Parameters:
      connect: opens the writer's own connection, kept for as long as it works; ``begin()``
        on it must start a write transaction.
      one_statement: kinds of write (their `Apply`) that take one statement per batch. A
        batch of one such kind alone is committed by its statement (autocommit): one round
        trip to the database instead of three (BEGIN, the statement, COMMIT). A statement is
        atomic, so such a batch is still all or nothing.

    Batches are committed one at a time, in the order their writes were handed in: a write is
    never committed before one handed in earlier (the embedded broker's acks rely on it). One
    thread is enough: a second, on a connection of its own, would make batches smaller and
    slower (its Python competes for the same GIL).

    A write may wait out a database outage (the worker's start and end of a job do): it is then
    tried again, with growing pauses, for as long as the database is down, since a worker can
    neither run a job it could not record nor acknowledge one whose end it could not record.
    Any other write fails with the outage error. A write that fails for any other reason fails
    alone: its batch is committed again without it.
    """

    def __init__(
        self, connect: Callable[[], Connection], *, one_statement: frozenset[Apply[Any, Any]] = frozenset()
    ) -> None:
        self._thread: BatchThread[_Write] = BatchThread(
            "store-writer",
            lambda: _Writer(connect, one_statement),
            max_batch=MAX_BATCH,
            gather_gap_s=GATHER_GAP_S,
            gather_max_s=GATHER_MAX_S,
            next_items=_next_writes,
        )

    def write(
        self, apply: Apply[T, R], item: T, *, wait_out_outage: bool = True, next_writes: int = 0
    ) -> R:
        """Commit one item with the next batch and return its result (see `submit`)."""
        return self.submit(apply, item, wait_out_outage=wait_out_outage, next_writes=next_writes).result()

    def submit(
        self, apply: Apply[T, R], item: T, *, wait_out_outage: bool = True, next_writes: int = 0
    ) -> Pending[R]:
        """Hand `item` to the writer, to be applied by `apply` with the other items of its kind
        in the next batch. Returns at once; the future is done when the write is committed (its
        callbacks then run on the writer thread), or has failed.

        Parameters:
          wait_out_outage(bool): try it again for as long as the database is unreachable,
            instead of failing with the outage's error.
          next_writes(int): how many writes the caller will hand in soon after this one is
            committed (a worker thread, once its job's start is: the job's end and the next
            job's start). The batch after this one waits for them, for `GATHER_MAX_S` at most.
        """
        future: Pending[R] = Pending()
        self._thread.put(_Write(apply, item, wait_out_outage, future, next_writes))
        return future

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until every write handed in so far is committed (or has failed): batches are
        committed in order, so until a write handed in now is. False if `timeout_s` ran out."""
        return self.submit(_nothing, None).wait(timeout_s)

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Commit what was handed in, then stop the thread (a later write starts a new one).

        Parameters:
          timeout_s(float): seconds to wait at most, for a database that is down; the writes
            left are then lost with the process, and their messages delivered again.
        """
        self._thread.close(timeout_s)


class _Writer:
    """The writer thread's connection, and how it commits a batch."""

    def __init__(self, connect: Callable[[], Connection], one_statement: frozenset[Apply[Any, Any]]) -> None:
        self.connect = connect
        self.one_statement = one_statement
        self.connection: Optional[Connection] = None
        self.autocommit = False  # the connection's mode

    def __call__(self, batch: list[_Write]) -> None:
        self.commit(batch)

    def close(self) -> None:
        self.disconnect(broken=False)

    def commit(self, batch: list[_Write]) -> None:
        backoff = Backoff(OUTAGE_FIRST_PAUSE_S, OUTAGE_MAX_PAUSE_S)
        while batch:
            try:
                results = self._apply(batch)
            except OUTAGE_ERRORS as error:
                self.disconnect(broken=True)
                for write in batch:
                    if not write.waits_out_outage:
                        write.future.set_exception(error)
                batch = [write for write in batch if write.waits_out_outage]
                if batch:
                    logger.warning("The store is unreachable ({}); retrying in {:.1f} s.", type(error).__name__, backoff.next_s)
                    backoff.pause()
                continue
            except Exception as error:
                if len(batch) == 1:
                    batch[0].future.set_exception(error)
                else:
                    logger.warning("A batch of {} store writes failed ({!r}); committing them one by one.", len(batch), error)
                    for write in batch:
                        self.commit([write])
                return
            for write, value in zip(batch, results):
                write.future.set_result(value)
            return

    def _apply(self, batch: list[_Write]) -> list[Any]:
        """Apply the batch in one transaction, kind by kind; the results in batch order."""
        kinds: dict[Apply[Any, Any], list[int]] = {}
        for index, write in enumerate(batch):
            kinds.setdefault(write.apply, []).append(index)
        results: list[Any] = [None] * len(batch)
        if self.connection is None:
            self.connection = self.connect()
        self._set_autocommit(len(kinds) == 1 and next(iter(kinds)) in self.one_statement)
        # Under autocommit, begin() and its commit send nothing.
        with self.connection.begin():
            for apply, indexes in kinds.items():
                for index, value in zip(indexes, apply(self.connection, [batch[i].item for i in indexes])):
                    results[index] = value
        return results

    def _set_autocommit(self, autocommit: bool) -> None:
        assert self.connection is not None
        if autocommit != self.autocommit:
            level = "AUTOCOMMIT" if autocommit else self.connection.default_isolation_level
            self.connection.execution_options(isolation_level=level)
            self.autocommit = autocommit

    def disconnect(self, *, broken: bool) -> None:
        connection, self.connection = self.connection, None
        self.autocommit = False
        if connection is None:
            return
        if broken:
            connection.invalidate()  # it must not go back to the pool
        connection.close()


def _next_writes(write: _Write) -> int:
    return write.next_writes


def _nothing(connection: Connection, items: list[None]) -> list[None]:
    return items
