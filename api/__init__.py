"""The HTTP shim: job status, control and Prometheus metrics, on the standard library."""
