"""Serving an ASGI app with uvicorn: in the foreground (a command), or inside a running run.

An embedded server binds its socket first (port 0 picks a free one, so the
URL is known before serving starts), leaves signal handling to its host,
and stops when its task group is cancelled.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskGroup

from pipeline.errors import PipelineError, StateError

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the program hosting it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class _ForegroundServer(uvicorn.Server):
    """A uvicorn server for a command: SIGINT/SIGTERM is how it is stopped, so after its
    graceful shutdown the command ends normally (exit 0); uvicorn would raise the signal
    again (an "interrupted" exit 3, or death by SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


@dataclass(frozen=True, slots=True)
class Served:
    """A running server: its base URL and uvicorn's server object (for its connections)."""

    url: str
    server: uvicorn.Server


class CannotListen(PipelineError):
    """No socket can listen on the host and port asked for (exit 2: bad usage or config).

    The message is one line naming ``host:port`` and the reason: the port is in
    use, out of range (0-65535), or the address is not one of this machine's.
    """


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port).

    Raises CannotListen (never a bare OSError/OverflowError) when it cannot be had.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"{_url_host(host)}:{port}"
    if not 0 <= port <= 65535:
        raise CannotListen(f"cannot listen on {where}: a port is 0-65535")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = getattr(exc, "strerror", None) or str(exc)
        hint = {errno.EADDRINUSE: " (another process listens there; choose another port)",
                errno.EADDRNOTAVAIL: " (not an address of this machine)"}.get(
                    getattr(exc, "errno", None) or 0, "")
        raise CannotListen(f"cannot listen on {where}: {reason}{hint}") from None
    sock.set_inheritable(True)
    return sock


def _config(app: Any, **options: Any) -> uvicorn.Config:
    # log_config None: uvicorn's default would dictConfig handlers onto its loggers, which
    # in a host process (pipeline.run from Airflow) are the host's to set up.
    return uvicorn.Config(
        app, log_level=options.pop("log_level", "warning"), access_log=False,
        log_config=options.pop("log_config", None),
        lifespan="on", timeout_graceful_shutdown=options.pop("grace_s", 2.0),
        timeout_keep_alive=options.pop("timeout_keep_alive", 5), **options,
    )


class _Startup:
    """ASGI wrapper that reports when the app's lifespan startup has completed (or failed)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.done = anyio.Event()
        self.failure: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watch(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                self.failure = str(message.get("message") or "startup failed")
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                self.done.set()
            await send(message)

        await self.app(scope, receive, watch)


@contextlib.asynccontextmanager
async def serve_embedded(
    app: Any, tg: TaskGroup, *, host: str = "127.0.0.1", port: int = 0,
    attach: Callable[[uvicorn.Server], None] | None = None, grace_s: float = 2.0,
    **options: Any,
) -> AsyncIterator[Served]:
    """Serve ``app`` on a task of ``tg`` until the block ends; yields once it has started.

    The socket is listening before uvicorn starts, so no request is refused
    in between; the wait is for the app's own startup (its lifespan).
    ``options`` go to ``uvicorn.Config`` (the sink's limits).
    """
    sock = bind(host, port)
    startup = _Startup(app)
    server = _EmbeddedServer(_config(startup, grace_s=grace_s, **options))
    if attach is not None:
        attach(server)
    tg.start_soon(server.serve, [sock])
    try:
        with anyio.fail_after(10):
            await startup.done.wait()
        if startup.failure is not None:
            raise StateError(f"embedded server failed to start: {startup.failure}")
        name = sock.getsockname()
        yield Served(f"http://{_url_host(name[0])}:{name[1]}", server)
    finally:
        server.should_exit = True  # uvicorn notices within 0.1 s; tg waits for its shutdown


def serve_foreground(
    app: Any, *, host: str, port: int, attach: Callable[[uvicorn.Server], None] | None = None,
    sock: socket.socket | None = None, **options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's own handling): ``tasknotes sink`` and ``emulator``.

    ``options`` go to ``uvicorn.Config`` (the sink's limits). ``sock``: a socket already
    bound to host:port (``bind``), else one is bound here. Raises CannotListen when
    host:port cannot be had. Returns once stopped by SIGINT or SIGTERM.
    """
    sock = sock or bind(host, port)
    # uvicorn's own log setup would print its INFO lines whatever -q says: its loggers are
    # left to the command's logging (WARNING unless -vv), as everything else on stderr is.
    server = _ForegroundServer(_config(app, log_level=None, log_config=None, **options))
    if attach is not None:
        attach(server)
    log.info("listening on http://%s:%d", _url_host(host), sock.getsockname()[1])
    server.run(sockets=[sock])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
