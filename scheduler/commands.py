"""The ``engine scheduler`` and ``engine schedules`` commands (added to `engine.cli`'s parser)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any, Callable

from rich.markup import escape

from engine.cli import json_or_text, keyword_argument, make_table, print_json, print_line, print_table


def scheduler(args: argparse.Namespace) -> int:
    """Run a scheduler: fire the store's cron schedules (run any number, on any hosts)."""
    from .__main__ import main

    return main([])


def schedules(args: argparse.Namespace) -> int:
    """List the cron schedules, each with its last and next fire."""
    import engine

    listed = engine.list_schedules()
    if args.json:
        print_json([each.to_dict() for each in listed])
        return 0
    table = make_table("name", "actor", "cron", "zone", "state", "last fire", "next fire")
    for each in listed:
        last = each.last_fire
        table.add_row(
            escape(each.schedule.name), each.schedule.actor, each.schedule.cron, each.schedule.timezone,
            "enabled" if each.schedule.enabled else "[yellow]paused[/]",
            f"{_local(last.fire_time, each.schedule.timezone)} {last.outcome}" if last else "",
            each.next_fire_time.isoformat(sep=" ") if each.next_fire_time else "",
        )  # fmt: skip
    print_table(table)
    return 0


def show(args: argparse.Namespace) -> int:
    """A schedule, its next fire times and its recent fires."""
    import engine

    info = engine.get_schedule(args.name)
    fires = engine.schedule_fires(args.name, limit=args.fires)
    upcoming = engine.preview_schedule(args.name, args.next) if info.schedule.enabled else []
    if args.json:
        print_json({**info.to_dict(), "next_fire_times": [each.isoformat() for each in upcoming], "fires": [fire.to_dict() for fire in fires]})
        return 0
    definition = info.schedule.model_dump(mode="json")
    print_line(f"[bold]{escape(info.schedule.name)}[/bold]  ({info.origin})")
    for name, value in definition.items():
        if name != "name":
            print_line(f"  {name}: {json.dumps(value) if isinstance(value, (list, dict)) else value}", markup=False)
    print_line("  next: " + (", ".join(each.isoformat(sep=" ") for each in upcoming) or "paused"))
    table = make_table("fire time", "outcome", "job", "recorded", "by")
    for fire in fires:
        table.add_row(
            _local(fire.fire_time, info.schedule.timezone), fire.outcome, fire.job_id or "",
            f"+{fire.recorded_at - fire.fire_time:.3f} s", fire.scheduler,
        )  # fmt: skip
    print_table(table)
    return 0


def add(args: argparse.Namespace) -> int:
    """Create or replace a schedule: `engine schedules add NAME ACTOR "CRON" --kwarg k=v ...`."""
    import engine.actors  # noqa: F401  (registers every actor, so the name can be checked)
    from engine import set_schedule

    fields: dict[str, Any] = {
        "args": [json_or_text(value) for value in args.args],
        "kwargs": dict(keyword_argument(item) for item in args.kwarg),
        "timezone": args.timezone,
        "misfire": args.misfire,
        "overlap": not args.no_overlap,
        "enabled": not args.paused,
    }
    for name in ("misfire_grace_s", "queue", "priority"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    info = set_schedule(args.name, args.actor, args.cron, **fields)
    print_line(f"{info.schedule.name}: next fire {info.next_fire_time.isoformat(sep=' ') if info.next_fire_time else 'none (paused)'}", markup=False)
    return 0


def _by_name(action: Callable[[str], Any], done: str, purpose: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        if action.__name__ == "run_schedule":
            import engine.actors  # noqa: F401  (the broker must know the actor to send it)
        result = action(args.name)
        detail = f" (job {result.id})" if getattr(result, "id", None) else ""
        print_line(f"{args.name}: {done}{detail}", markup=False)
        return 0

    command.__doc__ = purpose
    return command


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``scheduler`` and ``schedules`` to the ``engine`` parser (`command` adds a command)."""
    import engine

    command("scheduler", scheduler)
    group = command("schedules", schedules)
    group.add_argument("--json", action="store_true")
    actions = group.add_subparsers(title="actions", metavar="ACTION")

    def action(name: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=(handler.__doc__ or "").splitlines()[0], description=handler.__doc__)
        sub.set_defaults(command=handler)
        return sub

    sub = action("show", show)
    sub.add_argument("name")
    sub.add_argument("--fires", type=int, default=20, help="how many recent fires to show")
    sub.add_argument("--next", type=int, default=5, help="how many next fire times to show")
    sub.add_argument("--json", action="store_true")

    sub = action("add", add)
    sub.add_argument("name")
    sub.add_argument("actor")
    sub.add_argument("cron", help='5 fields, or 6 with seconds first, quoted: "0 3 * * *"')
    sub.add_argument("args", nargs="*", help="positional arguments (JSON, or plain text)")
    sub.add_argument("--kwarg", "-k", action="append", default=[], metavar="NAME=VALUE")
    sub.add_argument("--timezone", default="UTC", help="IANA zone (default UTC)")
    sub.add_argument("--misfire", choices=["once", "skip"], default="once")
    sub.add_argument("--misfire-grace-s", type=float)
    sub.add_argument("--no-overlap", action="store_true", help="skip a fire while the previous job is unfinished")
    sub.add_argument("--queue")
    sub.add_argument("--priority", type=int)
    sub.add_argument("--paused", action="store_true", help="create it paused")

    for name, function, done, purpose in (
        ("pause", engine.pause_schedule, "paused", "Pause a schedule: it fires no more until resumed."),
        ("resume", engine.resume_schedule, "resumed", "Resume a paused schedule from its next fire time."),
        ("run", engine.run_schedule, "job created now", "Create the schedule's job now, outside its cron times."),
        ("delete", engine.delete_schedule, "deleted", "Delete a schedule and its fire ledger; its jobs stay."),
    ):
        action(name, _by_name(function, done, purpose)).add_argument("name")


def _local(epoch: float, zone: str) -> str:
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(epoch, timezone.utc).astimezone(ZoneInfo(zone)).isoformat(sep=" ")

