"""`generate_report`: a JSON summary of recent jobs, for a daily e-mail or a dashboard.

It answers the questions asked after an incident: how many jobs ran, which actors failed and
how often, and how long their attempts took. The store answers each figure in one query;
writing a file (not a large result) keeps the job's row small.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import engine
from engine import JobState, PermanentError
from engine.settings import get_settings
from engine.store import Store


@engine.actor(max_retries=2, time_limit=10 * 60_000)
def generate_report(hours: float = 24, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Summarize the jobs created in the last `hours` into ``report-<UTC timestamp>.json``.

    The report holds the number of jobs per state, and per actor: how many jobs, how many
    succeeded and failed, the failure rate (failed / finished as succeeded or failed; null
    when none finished) and the p50 and p95 of its attempts' durations in milliseconds.

    Parameters:
      hours(float): how far back to look, by creation time.
      output_dir(str): the folder to write to; by default ``reports`` under ENGINE_OUTPUT_DIR.

    Returns:
      dict: ``{"path": the report file, "totals": jobs per state}``.

    Raises:
      PermanentError: `hours` is not a positive number.
    """
    if not 0 < hours < math.inf:
        raise PermanentError(f"hours must be a positive number, got {hours}")
    now = time.time()
    since = now - hours * 3600
    store = engine.get_store()

    engine.progress(0, "counting jobs")
    totals, actors = _count_jobs(store, since)
    engine.progress(40, "measuring attempt durations")
    for actor, durations in store.attempt_durations_by_actor(created_since=since).items():
        actors[actor]["duration_ms"] = {"p50": _percentile(durations, 50), "p95": _percentile(durations, 95)}

    engine.progress(80, "writing the report")
    report = {"generated_at": _iso(now), "since": _iso(since), "hours": hours, "totals": totals, "actors": actors}
    folder = Path(output_dir) if output_dir else get_settings().output_dir / "reports"
    path = _write(folder / f"report-{datetime.fromtimestamp(now, timezone.utc):%Y%m%dT%H%M%S.%fZ}.json", report)
    engine.progress(100, f"report written to {path}")
    return {"path": str(path), "totals": totals}


def _count_jobs(store: Store, since: float) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Jobs per state and per actor, from one count so that both views add up."""
    totals = {state.value: 0 for state in JobState}
    actors: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "succeeded": 0, "failed": 0})
    for actor, state, count in store.count_by_actor_and_state(created_since=since):
        totals[state] += count
        actors[actor]["count"] += count
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            actors[actor][state] += count
    for summary in actors.values():
        finished = summary["succeeded"] + summary["failed"]
        summary["failure_rate"] = summary["failed"] / finished if finished else None
        summary["duration_ms"] = {"p50": None, "p95": None}
    return totals, dict(actors)


def _percentile(ordered: list[float], percent: float) -> float:
    """The nearest-rank percentile: a duration that some attempt really took."""
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def _write(path: Path, report: dict[str, Any]) -> Path:
    """Write through a temporary file, so that a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)
    return path.resolve()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
