"""The Unix-datagram notifier: a directory of sockets beside the store's file, one per listener."""

from __future__ import annotations

import os
import socket
import threading

from engine.notifiers import SocketDirectory, sidecar_directory
from engine.store import Store


def test_the_sidecar_directory_sits_beside_the_database_file(store, tmp_path):
    assert sidecar_directory(store, "wake") == tmp_path / "engine.db.wake"
    assert sidecar_directory(store, "cancel") == tmp_path / "engine.db.cancel"


def test_a_store_in_no_file_has_no_sidecar_directory():
    memory = Store("sqlite://")
    try:
        assert sidecar_directory(memory, "wake") is None
    finally:
        memory.close()


def test_a_broadcast_reaches_every_bound_socket_and_close_removes_it(tmp_path):
    directory = SocketDirectory(tmp_path / "sockets")
    first, second = directory.bind(), directory.bind()

    assert directory.broadcast(b"job-1") == []

    assert first.receive(1.0) == b"job-1"
    assert second.receive(1.0) == b"job-1"
    assert first.receive(0) is None
    first.close()
    assert os.listdir(directory.path) == [second.path.name]
    second.close()


def test_a_broadcast_with_no_directory_yet_reaches_nobody(tmp_path):
    assert SocketDirectory(tmp_path / "never-bound").broadcast(b"x") == []


def test_a_socket_nobody_is_bound_to_is_removed_by_the_next_broadcast(tmp_path):
    directory = SocketDirectory(tmp_path / "sockets")
    directory.path.mkdir()
    stale = directory.path / "12345-dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as died:
        died.bind(str(stale))  # closed without unlinking, as by a process that died

    directory.broadcast(b"x")

    assert not stale.exists()


def test_a_full_socket_is_named_and_drain_empties_it(tmp_path):
    directory = SocketDirectory(tmp_path / "sockets")
    listener = directory.bind()
    unreached: list[str] = []
    for _ in range(100_000):
        unreached = directory.broadcast(b"\0" * 512)
        if unreached:
            break

    assert unreached == [str(listener.path)]
    listener.drain()
    assert listener.receive(0) is None
    listener.close()


def test_listen_calls_back_from_its_thread_until_close(tmp_path):
    directory = SocketDirectory(tmp_path / "sockets")
    received: list[bytes] = []
    got = threading.Event()
    directory.listen(lambda message: (received.append(message), got.set()), thread_name="test-listener")

    directory.broadcast(b"job-1")

    assert got.wait(5)
    directory.close()
    assert received == [b"job-1"]
    assert os.listdir(directory.path) == []
