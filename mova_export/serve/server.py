"""Run the app under uvicorn: the port checked before anything loads, the bundle loaded in the background
(/health 503 meanwhile), a bundle that fails to load stops the server with its one-line error."""
from __future__ import annotations

import errno
import socket
from typing import Any, Callable

from ..core.errors import ServeError
from .app import ServeOptions, create_app


def check_port(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's traceback-free but late exit, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise ServeError(f"{host}:{port} {why}; pass another --port or --host") from None


def serve(options: ServeOptions, loader: Callable[[], Any], host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until interrupted. Raises ServeError when the address is taken or the bundle fails to load."""
    import uvicorn

    check_port(host, port)
    failure: list[str] = []
    server: Any = None

    def failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(options, loader=loader, on_load_failure=failed)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if failure:
        raise ServeError(f"the bundle did not load: {failure[0]}")
