"""One API process: ``engine api``, or ``python -m api`` under ``engine run``'s supervisor.

It imports `engine.actors` (so that jobs can be submitted by name) and answers on
``ENGINE_API_HOST:ENGINE_API_PORT``, or on the listening socket the supervisor passed it
(``--socket-fd``), until SIGTERM.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Callable, Optional

from dramatiq import Broker
from loguru import logger

from engine.settings import Settings
from engine.worker import run_engine_process

from . import start as start_server


def main(argv: Optional[list[str]] = None) -> int:
    """Run the API until SIGTERM (or SIGINT when not supervised).

    Returns:
      int: 0 after a stop, `EXIT_CONFIG` when the settings or the actors are broken or the
      address cannot be bound, `EXIT_KILLED` when the supervisor was already gone.
    """
    parser = argparse.ArgumentParser(prog="python -m api", description="Run the HTTP API and status page.")
    parser.add_argument("--host", help="address to bind (ENGINE_API_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (ENGINE_API_PORT, default 8080)")
    parser.add_argument("--socket-fd", type=int, help="a listening socket to answer on, inherited from the supervisor")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid: exit when it dies")
    args = parser.parse_args(argv)

    def start(settings: Settings, _broker: Broker) -> Callable[[], None]:
        overrides = {"api_host": args.host, "api_port": args.port}
        settings = settings.model_copy(update={name: value for name, value in overrides.items() if value is not None})
        listener = socket.socket(fileno=args.socket_fd) if args.socket_fd is not None else None
        server = start_server(settings, listener)

        def stop() -> None:
            logger.info("API stopping")
            server.shutdown()
            server.server_close()

        return stop

    return run_engine_process("engine api", start, parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
