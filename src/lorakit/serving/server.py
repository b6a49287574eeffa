"""Running the app on uvicorn: in the foreground (``lorakit serve``) or on a background thread
(tests, benchmarks, notebooks), always stopping the engine with the server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lorakit.errors import ServingError
from lorakit.serving.app import create_app
from lorakit.serving.engine import Engine

if TYPE_CHECKING:
    import uvicorn

__all__ = ["serve", "background"]


def _server(engine: Engine, host: str, port: int, log_level: str) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(
        create_app(engine),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,  # a client that never reads must not hold the shutdown forever
    )
    return uvicorn.Server(config)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C); the engine runs for as long as the server does."""
    server = _server(engine, host, port, log_level)
    with engine:
        server.run()


@contextlib.contextmanager
def background(
    engine: Engine, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 60.0
) -> Iterator[str]:
    """Serve on a background thread; yields the base URL (``http://host:port``, the port the OS chose
    when ``port=0``) once the server accepts connections, and stops server and engine on exit."""
    server = _server(engine, host, port, log_level)
    thread = threading.Thread(target=server.run, name="lorakit-server", daemon=True)
    with engine:
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServingError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        sockets = [s for srv in server.servers for s in srv.sockets]
        bound_port = sockets[0].getsockname()[1] if sockets else port
        try:
            yield f"http://{host}:{bound_port}"
        finally:
            server.should_exit = True
            thread.join()
