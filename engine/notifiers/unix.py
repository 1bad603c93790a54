"""Notifications between the processes of one machine: a directory of Unix datagram sockets, one
per listening process. A broadcast sends each socket in the directory one datagram; a socket left
behind by a process that died is removed by the next broadcast that finds nobody bound to it."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from select import select as wait_readable
from typing import TYPE_CHECKING, Optional
from uuid import uuid4

from loguru import logger

from ._delivery import OnMessage, deliver

if TYPE_CHECKING:
    from ..store import Store

#: The longest message a listener reads; longer ones are cut.
MAX_MESSAGE_BYTES = 1024

#: How long `SocketDirectory.listen`'s thread waits for a message before it looks whether it is
#: closing: a wake-up lost on close costs at most this long.
RECEIVE_TIMEOUT_S = 1.0


def sidecar_directory(store: Store, purpose: str) -> Optional[Path]:
    """The directory of sockets of one purpose beside the store's SQLite file: ``<database>.<purpose>/``.

    Parameters:
      store(Store): the store whose database file the processes share.
      purpose(str): what the sockets carry, such as ``"wake"`` or ``"cancel"``.

    Returns:
      Path: an absolute path, the same from every process whatever its working directory; None
        when the store is not in a file (PostgreSQL, an in-memory SQLite), so that no directory
        is shared.
    """
    database = store.database_file
    if not database:
        return None
    return Path(os.path.abspath(f"{database}.{purpose}"))


class SocketListener:
    """One process's socket in a `SocketDirectory`, non-blocking; `close` removes it.

    It has a `fileno`, so that it can be waited on with ``select`` beside other files.
    """

    def __init__(self, bound: socket.socket, path: Path) -> None:
        bound.setblocking(False)
        self.path = path
        self._socket = bound

    def fileno(self) -> int:
        return self._socket.fileno()

    def receive(self, timeout_s: float) -> Optional[bytes]:
        """The next message, waiting `timeout_s` seconds at most.

        Returns:
          bytes: the message (empty when `wake` was called); None when none came in time.
        """
        if not wait_readable([self._socket], [], [], max(timeout_s, 0))[0]:
            return None
        try:
            return self._socket.recv(MAX_MESSAGE_BYTES)
        except BlockingIOError:
            return None

    def drain(self) -> None:
        """Read and drop the messages waiting, for a listener to whom many are worth one."""
        with contextlib.suppress(BlockingIOError):
            while self._socket.recv(MAX_MESSAGE_BYTES):
                pass

    def wake(self) -> None:
        """Send this socket an empty message, to end a `receive` waiting in another thread."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender, contextlib.suppress(OSError):
            sender.sendto(b"", str(self.path))

    def close(self) -> None:
        """Stop listening and remove the socket from its directory."""
        self._socket.close()
        self.path.unlink(missing_ok=True)


class SocketDirectory:
    """A directory of Unix datagram sockets, one per listening process; created by the first.

    Use `bind` for a socket to wait on in a loop of one's own, or `listen` for a thread that
    calls back with each message.

    Parameters:
      path(Path): the directory, such as `sidecar_directory`'s.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener: Optional[SocketListener] = None
        self._thread: Optional[threading.Thread] = None
        self._closing = threading.Event()

    def broadcast(self, message: bytes) -> list[str]:
        """Send `message` to every socket in the directory, without waiting for any.

        Returns:
          list[str]: the sockets it could not reach because their buffers are full of messages
            not read yet.
        """
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []  # nobody has listened yet
        full: list[str] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            for name in names:
                path = self.path / name
                try:
                    sender.sendto(message, str(path))
                except BlockingIOError:
                    full.append(str(path))
                except (ConnectionRefusedError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # nobody is bound to it: its process died
                except OSError:
                    logger.opt(exception=True).warning("Failed to send a notification to {}.", path)
        return full

    def bind(self) -> SocketListener:
        """A socket of this process in the directory, which every broadcast reaches from now on.

        Raises:
          OSError: the directory cannot be created or the socket bound (a path too long, say).
        """
        path = self.path / f"{os.getpid()}-{uuid4().hex[:8]}.sock"
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.path.mkdir(exist_ok=True)
            bound.bind(str(path))
        except OSError as error:
            bound.close()
            if error.filename is None:
                error.filename = str(path)  # socket calls name no file: say which one failed
            raise
        return SocketListener(bound, path)

    def listen(self, on_message: OnMessage, *, thread_name: str) -> None:
        """Call `on_message` with each message, from a thread of its own, until `close`.

        Raises:
          OSError: as `bind` does.
        """
        self._closing.clear()
        self._listener = self.bind()
        self._thread = threading.Thread(target=self._receive, args=(on_message,), name=thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread `listen` started, and remove its socket."""
        if self._listener is None:
            return
        self._closing.set()
        self._listener.wake()
        if self._thread is not None:
            self._thread.join()
        self._listener.close()
        self._listener = self._thread = None

    def _receive(self, on_message: OnMessage) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            message = self._listener.receive(RECEIVE_TIMEOUT_S)
            if message:
                deliver(on_message, message, self._listener.path)
