"""bench.throughput's rounds (medians of the rates and latencies, the ratio of each round), its
ratios against huey, and the huey variant and bench.senders run end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from bench.throughput import median_result, ratios, ratios_by_round
from tests.support.processes import run_process

REPO = Path(__file__).resolve().parents[2]


def result(noop: float, io: float, enqueue: float, p50: float, rss: float) -> dict:
    return {
        "enqueue_rate": enqueue,
        "noop": {"rate": noop},
        "io_1ms": {"rate": io},
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "rss_mb_after_n": {"1": rss},
        "rss_mb_after_2n": {"1": rss},
    }


def test_each_rate_and_latency_is_the_median_of_the_rounds_and_the_rest_is_the_median_rounds():
    runs = [result(100, 50, 3000, 3.0, 60.0), result(300, 10, 1000, 1.0, 70.0), result(200, 90, 2000, 5.0, 65.0)]

    merged = median_result(runs)

    assert (merged["noop"]["rate"], merged["io_1ms"]["rate"], merged["enqueue_rate"]) == (200, 50, 2000)
    assert merged["latency_ms"] == {"p50": 3.0, "p99": 6.0}
    assert merged["rss_mb_after_n"] == {"1": 65.0}  # from the round with the median no-op rate
    assert runs[2]["io_1ms"]["rate"] == 90  # the rounds are left as they were


def test_the_ratio_of_each_round_is_listed_against_each_bare_variant():
    rounds = {
        "bare": [result(100, 100, 1, 1, 1), result(200, 100, 1, 1, 1)],
        "engine-pg": [result(50, 40, 1, 1, 1), result(50, 60, 1, 1, 1)],
    }

    assert ratios_by_round(rounds) == "engine-pg / bare, each round (no-op / 1 ms I/O): 0.50 / 0.40, 0.25 / 0.60"


def test_the_engine_is_compared_with_huey_and_huey_with_nothing():
    results = {"engine-sqlite": result(50, 40, 100, 5.0, 60.0), "huey": result(100, 80, 400, 50.0, 40.0)}
    rounds = {name: [run, run] for name, run in results.items()}

    text = ratios(results, 1000)

    assert "  against huey           no-op 0.50 x, 1 ms I/O 0.50 x, enqueue 0.25 x" in text.splitlines()
    assert not any(line.startswith("huey") for line in text.splitlines())
    assert ratios_by_round(rounds) == "engine-sqlite / huey, each round (no-op / 1 ms I/O): 0.50 / 0.50, 0.50 / 0.50"


def need_huey() -> None:
    """huey is optional for a developer (skip), never for CI (fail): it is in the test extras."""
    if importlib.util.find_spec("huey") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("huey is not installed: CI installs it with the test extras (pip install -e '.[test]')")
        pytest.skip("huey is not installed: pip install -e '.[bench]'")


def run_bench(module: str, *args: str) -> None:
    done = run_process(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_huey_variant_runs_every_phase_and_reports_positive_rates(tmp_path):
    need_huey()
    out = tmp_path / "results.json"

    run_bench("bench.throughput", "--messages", "200", "--variants", "huey", "--probes", "20", "--json", str(out))

    huey = json.loads(out.read_text())["results"]["huey"]
    assert min(huey["enqueue_rate"], huey["noop"]["rate"], huey["io_1ms"]["rate"]) > 0
    assert huey["latency_probes"] == 20 and huey["latency_ms"]["p50"] > 0
    # Two huey_consumer processes, the same two after 2N jobs.
    assert len(huey["rss_mb_after_n"]) == 2 and huey["rss_mb_after_n"].keys() == huey["rss_mb_after_2n"].keys()
    assert min(huey["rss_mb_after_n"].values()) > 0


def test_concurrent_senders_account_for_every_job_sent_or_failed(tmp_path):
    need_huey()
    out = tmp_path / "senders.json"

    run_bench("bench.senders", "--variant", "huey", "--jobs", "320", "--json", str(out))

    result = json.loads(out.read_text())
    assert result["sent"] + sum(result["errors"].values()) == 320
    assert result["sent"] > 0 and result["send_rate"] > 0 and result["processed_rate"] > 0


def test_without_huey_ci_fails_and_a_developer_is_told_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        need_huey()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"pip install -e '\.\[bench\]'"):
        need_huey()
