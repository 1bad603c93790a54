"""bench.throughput's rounds: medians of the rates and latencies, and the ratio of each round."""

from __future__ import annotations

from bench.throughput import median_result, ratios_by_round


def result(noop: float, io: float, enqueue: float, p50: float, rss: float) -> dict:
    return {
        "enqueue_rate": enqueue,
        "noop": {"rate": noop},
        "io_1ms": {"rate": io},
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "rss_mb_after_n": {"1": rss},
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
