"""The ``engine`` command: run the engine, submit jobs and look at them.

Every command prints errors as one line (``error: ...``) and exits 2 for bad input or
configuration (an actor module that does not import among them), 1 when a watched job did not
succeed: never a stack trace for a user's mistake. Like ``dramatiq``, every command finds the
modules of ``ENGINE_ACTOR_MODULES`` in the current directory.

Ids and states are printed whole, however narrow the terminal: a table is as wide as its longest
id needs, and piped output is one row a line, with no borders, for ``grep`` and ``awk``. The
helpers that print them (`make_table`, `print_table`, `print_line`) serve `scheduler.commands` too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from sqlalchemy.exc import OperationalError

from .errors import EngineError
from .job import JobState
from .settings import get_settings

if TYPE_CHECKING:
    from .supervisor import ProcessKind

console = Console()
errors = Console(stderr=True)

#: A width no table reaches: what a table is measured in, to learn the width it wants.
_UNLIMITED_WIDTH = 100_000

_STATE_STYLES = {
    JobState.SCHEDULED: "cyan",
    JobState.QUEUED: "blue",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.CANCELED: "magenta",
}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``engine`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    # As `python -m` and `dramatiq` do: the user's modules are found where the command is run.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return args.command(args)
    except (EngineError, OperationalError) as error:
        message = str(error).splitlines()[0] if isinstance(error, OperationalError) else str(error)
        errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


# -- running the engine --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The whole engine on one machine: the API, a scheduler and supervised workers, stopped together."""
    from api import listen

    from .supervisor import SCHEDULER, api_process

    # Bound here, before any process starts: a taken port is reported at once, and a restarted
    # API process answers on the same socket.
    with listen(get_settings()) as listener:
        return worker(args, others=[SCHEDULER, api_process(listener)])


def worker(args: argparse.Namespace, others: Sequence[ProcessKind] = ()) -> int:
    """Supervised worker processes; a dead one is restarted while the others keep working."""
    from .logging import setup_logging
    from .supervisor import run_workers

    settings = get_settings()
    setup_logging(settings)
    return run_workers(
        settings,
        processes=args.processes or settings.worker_processes,
        threads=args.threads or settings.worker_threads,
        queues=args.queues,
        others=others,
    )


def api(args: argparse.Namespace) -> int:
    """The HTTP API and status page alone, on ENGINE_API_HOST:ENGINE_API_PORT."""
    from api.__main__ import main as run_api

    options = [*(["--host", args.host] if args.host else []), *(["--port", str(args.port)] if args.port is not None else [])]
    return run_api(options)


def metrics_server(args: argparse.Namespace) -> int:
    """/metrics of worker processes started by ``dramatiq engine.actors``: the sum of the files
    they write to PROMETHEUS_MULTIPROC_DIR, on ENGINE_METRICS_HOST:ENGINE_METRICS_PORT."""
    from .logging import setup_logging
    from .metrics.host import serve_directory

    settings = get_settings()
    setup_logging(settings)
    return serve_directory(settings)


def db_upgrade(args: argparse.Namespace) -> int:
    """Create or migrate the job store's schema."""
    from .store import migrations

    before = _upgrade_store()
    console.print(f"job store at schema version {migrations.LATEST} (was {before or 'empty'})")
    return 0


def _upgrade_store() -> int:
    from .store import Store

    store = Store(get_settings().store_url)
    try:
        return store.upgrade()
    finally:
        store.close()


# -- jobs ----------------------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    """Send a job; positional arguments are JSON values, or strings when they are not JSON."""
    import engine.actors  # noqa: F401  (registers every actor, so the name can be checked)

    from .client import submit as submit_job

    kwargs = dict(keyword_argument(item) for item in args.kwarg)
    job = submit_job(
        args.actor,
        *[json_or_text(value) for value in args.args],
        idempotency_key=args.idempotency_key,
        delay=args.delay,
        priority=args.priority,
        **kwargs,
    )
    if args.json:
        print_json(job.to_dict())
    else:
        print_line(f"{job.id} {styled(job.state)}")
    return watch_job(job.id) if args.wait else 0


def status(args: argparse.Namespace) -> int:
    """A job's state, progress, error and attempts."""
    from .client import attempts, get

    job, trail = get(args.id), attempts(args.id)
    if args.json:
        print_json({**job.to_dict(), "attempts_detail": [attempt.to_dict() for attempt in trail]})
        return 0
    print_line(f"[bold]{job.id}[/bold]  {job.actor}  {styled(job.state)}")
    print_line(f"  created {job.to_dict()['created_at']}  attempts {job.attempts}")
    if job.schedule is not None:
        print_line(f"  schedule {job.schedule}  fire time {job.to_dict()['fire_time'] or 'none (run now)'}")
    if job.progress_percent is not None:
        print_line(f"  progress {job.progress_percent:.0f}% {escape(job.progress_message or '')}")
    if job.last_error:
        print_line(f"  last error: {job.last_error}", markup=False)
    if trail:
        table = make_table("#", "outcome", "worker", "started", "duration", "error")
        for attempt in trail:
            row = attempt.to_dict()
            duration = f"{attempt.duration_ms:.0f} ms" if attempt.duration_ms is not None else ""
            worker_name = f"{attempt.worker_host}:{attempt.worker_pid}"
            error = escape(f"{attempt.error_type}: {attempt.error_message}") if attempt.error_type else ""
            table.add_row(str(attempt.number), attempt.outcome or "running", worker_name, row["started_at"], duration, error)
        print_table(table)
    return 0


def watch(args: argparse.Namespace) -> int:
    """A live progress bar until the job ends; exits 0 if it succeeded, 1 otherwise."""
    return watch_job(args.id, interval=args.interval)


def watch_job(job_id: str, *, interval: float = 0.5) -> int:
    from .client import get

    job = get(job_id)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[note]}"), console=console, transient=False) as bar:
        task = bar.add_task(f"{job.actor} {job.id[:8]}", total=100, note=job.state)
        while True:
            job = get(job_id)
            note = job.progress_message or job.state
            bar.update(task, completed=job.progress_percent or 0, note=note)
            if job.state.finished:
                if job.state == JobState.SUCCEEDED:
                    bar.update(task, completed=100)
                break
            time.sleep(interval)
    print_line(f"{job.id} {styled(job.state)}" + (f": {escape(job.last_error)}" if job.last_error and job.state != JobState.SUCCEEDED else ""))
    return 0 if job.state == JobState.SUCCEEDED else 1


def jobs(args: argparse.Namespace) -> int:
    """The newest jobs, filtered by state and actor."""
    from .client import jobs as list_jobs

    page = list_jobs(status=args.status, actor=args.actor, schedule=args.schedule, limit=args.limit, cursor=args.cursor)
    if args.json:
        print_json({"jobs": [job.to_dict() for job in page.jobs], "next_cursor": page.next_cursor})
        return 0
    table = make_table("id", "actor", "state", "attempts", "progress", "created")
    for job in page.jobs:
        percent = f"{job.progress_percent:.0f}%" if job.progress_percent is not None else ""
        table.add_row(job.id, job.actor, styled(job.state), str(job.attempts), percent, job.to_dict()["created_at"])
    print_table(table)
    if page.next_cursor:
        print_line(f"more: engine jobs --cursor {page.next_cursor}", markup=False)
    return 0


def retry(args: argparse.Namespace) -> int:
    """Requeue a failed or canceled job as a new attempt."""
    import engine.actors  # noqa: F401  (the broker must know the actor to send it again)

    from .client import retry as retry_job

    job = retry_job(args.id)
    print_line(f"{job.id} {styled(job.state)}")
    return 0


def cancel(args: argparse.Namespace) -> int:
    """Cancel a job: a waiting one never starts, a running one is stopped within a second."""
    from .client import CancelOutcome
    from .client import cancel as cancel_job

    done = cancel_job(args.id)
    if args.json:
        print_json({"outcome": done.outcome, "job": done.job.to_dict()})
        return 0
    notes = {
        CancelOutcome.CANCELED: "",
        CancelOutcome.REQUESTED: ": cancel requested, its worker is stopping it (engine status shows when)",
        CancelOutcome.ALREADY_FINISHED: ": already finished, nothing to cancel",
    }
    print_line(f"{done.job.id} {styled(done.job.state)}{notes[done.outcome]}")
    return 0


# -- output and arguments, shared by every command (scheduler.commands too) -----------------------


def styled(state: JobState) -> str:
    """`state` in its colour, as rich markup."""
    return f"[{_STATE_STYLES[state]}]{state}[/]"


def print_line(text: str, *, markup: bool = True) -> None:
    """Print `text` unwrapped: a long line runs on rather than break an id in two."""
    console.print(text, soft_wrap=True, highlight=False, markup=markup)


def make_table(*headers: str) -> Table:
    """A table whose cells fold rather than end in "…"; print it with `print_table`."""
    # Only the widths rich computes can cut a cell: `print_table` gives it room for all of them.
    return Table(*(Column(header, overflow="fold") for header in headers))


def print_table(table: Table) -> None:
    """Print `table` with no cell cut short.

    On a terminal the table is at least as wide as its longest words (ids, states) need,
    wider than the terminal if it must, and wraps the other cells between words. Piped, it
    has no borders and one row a line, as wide as its rows.
    """
    if not console.is_terminal:
        table.box, table.pad_edge = None, False
    unlimited = console.options.update_width(_UNLIMITED_WIDTH)
    # Squeezed, rich narrows the widest columns first, below their longest word: a column's
    # minimum width is what keeps that word (a long schedule name, an id) whole.
    for column in table.columns:
        column.min_width = max(Measurement.get(console, unlimited, cell).minimum for cell in [column.header, *column.cells])
    needed = Measurement.get(console, unlimited, table)
    width = max(console.width, needed.minimum) if console.is_terminal else needed.maximum
    # Console.print caps its width at the terminal's; a console of the needed width does not.
    Console(width=width, color_system=console.color_system, force_terminal=console.is_terminal).print(table)


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def json_or_text(value: str) -> Any:
    """A command-line value as JSON, or as the string itself when it is not JSON."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def keyword_argument(item: str) -> tuple[str, Any]:
    """``name=value`` as (name, value), the value by `json_or_text`.

    Raises:
      EngineError: `item` has no ``=`` or its name is not an identifier.
    """
    name, separator, value = item.partition("=")
    if not separator or not name.isidentifier():
        raise EngineError(f"--kwarg takes name=value, got {item!r}")
    return name, json_or_text(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Background jobs: every job tracked.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=(handler.__doc__ or "").splitlines()[0], description=handler.__doc__)
        sub.set_defaults(command=handler)
        return sub

    for name, handler in (("run", run), ("worker", worker)):
        sub = command(name, handler)
        sub.add_argument("--processes", "-p", type=int, help="worker processes (ENGINE_WORKER_PROCESSES)")
        sub.add_argument("--threads", "-t", type=int, help="threads per process (ENGINE_WORKER_THREADS)")
        sub.add_argument("--queues", "-Q", nargs="*", help="only these queues (default: all)")

    sub = command("api", api)
    sub.add_argument("--host", help="address to bind (ENGINE_API_HOST, default 127.0.0.1)")
    sub.add_argument("--port", type=int, help="port (ENGINE_API_PORT, default 8080)")

    command("metrics-server", metrics_server)

    db = commands.add_parser("db", help="manage the job store's schema")
    db_commands = db.add_subparsers(required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help=db_upgrade.__doc__).set_defaults(command=db_upgrade)

    sub = command("submit", submit)
    sub.add_argument("actor")
    sub.add_argument("args", nargs="*", help="positional arguments (JSON, or plain text)")
    sub.add_argument("--kwarg", "-k", action="append", default=[], metavar="NAME=VALUE")
    sub.add_argument("--idempotency-key")
    sub.add_argument("--delay", type=float, help="seconds before the job may start")
    sub.add_argument("--priority", type=int, help="0..10, higher first")
    sub.add_argument("--wait", action="store_true", help="watch the job until it ends")
    sub.add_argument("--json", action="store_true")

    sub = command("status", status)
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    sub = command("watch", watch)
    sub.add_argument("id")
    sub.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")

    sub = command("jobs", jobs)
    sub.add_argument("--status", choices=list(JobState))
    sub.add_argument("--actor")
    sub.add_argument("--schedule", help="only the jobs of this cron schedule")
    sub.add_argument("--limit", type=int, default=20)
    sub.add_argument("--cursor")
    sub.add_argument("--json", action="store_true")

    command("retry", retry).add_argument("id")

    sub = command("cancel", cancel)
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    from scheduler.commands import add_commands

    add_commands(command)
    return parser


if __name__ == "__main__":
    sys.exit(main())
