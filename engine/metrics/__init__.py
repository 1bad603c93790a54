"""The engine's Prometheus metrics (see the Metrics part of README.md).

- `engine.metrics.process`: what each process counts as it sends and runs jobs (Tracking's
  decisions), in prometheus-client's multiprocess files under a supervisor.
- `engine.metrics.host`: a worker host's sum of them, served by its supervisor with its count
  of restarts.
- `engine.metrics.cluster`: the cluster-wide gauges, read from the store, served by the API.
"""
