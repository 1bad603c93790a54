"""A worker host's metrics: the sum of its processes' (`engine.metrics.process`), and its
supervisor's count of restarts, served on ``ENGINE_METRICS_HOST:ENGINE_METRICS_PORT``.

Each process the supervisor starts writes its metrics to files of its own in a directory of
this supervisor run (prometheus-client's multiprocess mode: ``counter_<pid>.db`` and the like,
in PROMETHEUS_MULTIPROC_DIR), which a scrape reads and sums. When a process dies, its counters
and histograms are merged into one archive file per type, and its files are deleted: the sums
never go backwards, and the directory holds as many files as there are live processes, however
many have died, so a scrape costs no more after a day of restarts. Its gauges (attempts in
progress) go with it. The directory is new at every supervisor start and removed at its exit:
counters start again from zero with the supervisor, as Prometheus expects of a restart.

The server is the API's (`api.server.ApiServer`), on a thread of the supervisor: it answers
``GET /metrics`` and ``GET /healthz``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import suppress
from typing import Iterable, Iterator

from loguru import logger
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..errors import ConfigError
from ..settings import Settings

#: Where prometheus-client's processes write their metrics (read when a process's first metric is made).
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: The file types whose values outlive their process, summed into ``<type>_archive.db``.
ARCHIVED_TYPES = ("counter", "histogram", "summary")


class MetricsDirectory:
    """A multiprocess directory, and the collector that sums its files.

    Parameters:
      path(str): the directory: the processes that write to it have it in PROMETHEUS_MULTIPROC_DIR.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # A scrape must not read a dead process's files and their archive both, nor neither.
        self._lock = threading.Lock()

    @classmethod
    def fresh(cls) -> "MetricsDirectory":
        """A new, empty directory in the system's temporary one (``TMPDIR``); `remove` deletes it."""
        return cls(tempfile.mkdtemp(prefix="engine-metrics-"))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(MultiProcessCollector.merge(glob.glob(os.path.join(self.path, "*.db"))))

    def process_died(self, pid: int) -> None:
        """Fold the files of dead process `pid` into the archive, and delete them."""
        with self._lock:
            mark_process_dead(pid, self.path)
            for kind in ARCHIVED_TYPES:
                dead = os.path.join(self.path, f"{kind}_{pid}.db")
                if os.path.exists(dead):
                    self._archive(kind, dead)
            # Gauges of other modes than `live*` it may have left: they died with it.
            for leftover in glob.glob(os.path.join(self.path, f"*_{pid}.db")):
                os.remove(leftover)

    def _archive(self, kind: str, dead: str) -> None:
        archive = os.path.join(self.path, f"{kind}_archive.db")
        sources = [path for path in (archive, dead) if os.path.exists(path)]
        # Not accumulated: the archive keeps each bucket's own count, as a process's file does.
        merged = MultiProcessCollector.merge(sources, accumulate=False)
        staging = archive + ".new"  # not *.db: never read as a process's file
        with suppress(FileNotFoundError):
            os.remove(staging)
        written = MmapedDict(staging)
        try:
            for metric in merged:
                for sample in metric.samples:
                    key = mmap_key(metric.name, sample.name, list(sample.labels), list(sample.labels.values()), metric.documentation)
                    written.write_value(key, sample.value, 0.0)
        finally:
            written.close()
        os.replace(staging, archive)
        os.remove(dead)

    def file_count(self) -> int:
        """How many metric files it holds now."""
        return len(glob.glob(os.path.join(self.path, "*.db")))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class RestartCounter:
    """``engine_worker_restarts_total``: processes the supervisor restarted after they died."""

    def __init__(self) -> None:
        self.restarts = 0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "engine_worker_restarts", "Processes this host's supervisor restarted after they died.", value=self.restarts
        )


def own_metrics() -> list[object]:
    """This process's own metrics (`engine.metrics.process`, in its default registry), to serve
    when no supervisor sums them: none under a supervisor, whose directory holds them instead,
    so that nothing is counted twice."""
    return [] if MULTIPROC_DIR_VARIABLE in os.environ else [REGISTRY]


def registry_of(*collectors: object) -> CollectorRegistry:
    """A registry of exactly `collectors`."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


#: The text exposition format that `generate_latest` writes (the server adds the charset).
EXPOSITION_MEDIA_TYPE = "text/plain; version=0.0.4"


class MetricsServer:
    """``GET /metrics`` (the text exposition of `registry`) and ``GET /healthz``, on
    ``ENGINE_METRICS_HOST:ENGINE_METRICS_PORT``, answered by a daemon thread of this process.

    Raises:
      ConfigError: the address cannot be bound.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        from api.routing import Reply, Route, Router  # the API's shim; imported when metrics are served
        from api.server import ApiServer

        self.registry = registry
        address = (settings.metrics_host, settings.metrics_port or 0)
        try:
            listener = socket.create_server(address)
        except OSError as error:
            raise ConfigError(f"cannot serve metrics on {address[0]}:{address[1]}: {error.strerror or error}") from None
        router = Router([
            Route("GET", "/metrics", lambda _request: Reply(generate_latest(self.registry)), "Prometheus metrics",
                  media_type=EXPOSITION_MEDIA_TYPE, tag="metrics"),
            Route("GET", "/healthz", lambda _request: Reply("ok\n"), "Liveness", media_type="text/plain", tag="health"),
        ])  # fmt: skip
        self.server = ApiServer(settings, router, page_policy="default-src 'none'", listener=listener)
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "MetricsServer":
        self._thread.start()
        logger.info("Serving metrics on {}/metrics", self.url)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class HostMetrics:
    """What a supervisor that serves metrics keeps: its run's directory, its count of restarts,
    and the server; `close` stops the server and removes the directory.

    Raises:
      ConfigError: the metrics' address cannot be bound.
    """

    def __init__(self, settings: Settings) -> None:
        self.directory = MetricsDirectory.fresh()
        self.restarts = RestartCounter()
        try:
            self.server = MetricsServer(settings, registry_of(self.directory, self.restarts)).start()
        except BaseException:
            self.directory.remove()
            raise

    def child_env(self) -> dict[str, str]:
        """The environment of a process to start: this one's, its metrics written to the directory."""
        return {**os.environ, MULTIPROC_DIR_VARIABLE: self.directory.path}

    def process_died(self, pid: int) -> None:
        self.directory.process_died(pid)

    def process_restarted(self) -> None:
        self.restarts.restarts += 1

    def close(self) -> None:
        self.server.close()
        self.directory.remove()


def serve_directory(settings: Settings) -> int:
    """``engine metrics-server``: serve the sum of the files in PROMETHEUS_MULTIPROC_DIR until
    SIGTERM or SIGINT, for processes that no supervisor of the engine started (``dramatiq
    engine.actors`` run with that variable set). Dead processes' files are not archived:
    the directory must be emptied before the processes start.

    Raises:
      ConfigError: the variable is unset or not a directory, or ENGINE_METRICS_PORT is unset.
    """
    path = os.environ.get(MULTIPROC_DIR_VARIABLE, "")
    if not os.path.isdir(path):
        raise ConfigError(f"{MULTIPROC_DIR_VARIABLE} must name the directory the worker processes write their metrics to")
    if settings.metrics_port is None:
        raise ConfigError("ENGINE_METRICS_PORT: set the port to serve the metrics on")
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before the server's thread starts, so that it inherits the mask and they come here.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = MetricsServer(settings, registry_of(MetricsDirectory(path))).start()
    try:
        signal.sigwait(stop_signals)
    finally:
        server.close()
    return 0
