"""Slow and idle clients: 200 connections that send nothing, or a byte a second, neither stop
a normal request from being answered nor stay open past the read deadline."""

from __future__ import annotations

import socket
import threading
import time

import pytest

HEADER_TIMEOUT_S = 3.0


def _closed_by_server(connection: socket.socket, within_s: float) -> bool:
    """Whether the server closes `connection` within `within_s` (reads end, or reset)."""
    connection.settimeout(within_s)
    try:
        while connection.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_200_slow_clients_do_not_starve_a_normal_request_and_are_closed(serve):
    client = serve(api_header_timeout_s=HEADER_TIMEOUT_S, api_read_timeout_s=HEADER_TIMEOUT_S)
    silent = [socket.create_connection((client.host, client.port), timeout=10) for _ in range(100)]
    dripping = [socket.create_connection((client.host, client.port), timeout=10) for _ in range(100)]
    stop = threading.Event()

    def drip() -> None:  # a byte a second on each, a request that never ends
        request = b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for index in range(len(request)):
            for connection in dripping:
                try:
                    connection.send(request[index : index + 1])
                except OSError:
                    pass
            if stop.wait(1.0):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    opened = time.monotonic()
    try:
        time.sleep(1.2)  # every slow connection has its thread, the drippers have sent two bytes
        # when a normal client asks
        started = time.monotonic()
        answer = client.get("/api/jobs")
        # then it is answered within a second
        assert answer.status == 200
        assert time.monotonic() - started < 1.0
        # and every slow connection is closed once the header deadline has passed
        for connection in silent + dripping:
            remaining = HEADER_TIMEOUT_S + 3.0 - (time.monotonic() - opened)
            assert _closed_by_server(connection, max(remaining, 0.1)), "a slow connection outlived the deadline"
        assert time.monotonic() - opened >= HEADER_TIMEOUT_S - 0.5  # not closed early either
    finally:
        stop.set()
        dripper.join()
        for connection in silent + dripping:
            connection.close()
    assert client.get("/healthz").status == 200


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_a_body_sent_too_slowly_is_cut_off(serve):
    client = serve(api_header_timeout_s=5, api_read_timeout_s=1.5)
    with socket.create_connection((client.host, client.port), timeout=10) as connection:
        connection.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        assert _closed_by_server(connection, 5.0)
        assert 1.0 <= time.monotonic() - started < 4.0


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_connections_beyond_the_limit_are_refused_at_once(serve):
    client = serve(api_max_connections=5, api_header_timeout_s=5)
    held = [socket.create_connection((client.host, client.port), timeout=10) for _ in range(5)]
    try:
        time.sleep(0.3)
        refused = client.get("/healthz")
        assert refused.status == 503 and refused.json["error"]["code"] == "busy"
        assert refused.headers["Retry-After"] == "1"
    finally:
        for connection in held:
            connection.close()
    time.sleep(0.3)
    assert client.get("/healthz").status == 200
