"""The seam between a websocket library and `StreamServer.serve_client`: one accepted connection.

`Transport` is all the session code uses of a connection. `WebsocketsTransport` adapts the
`websockets` library (the plain server); `rtsvc.serve.ray_serve.StarletteTransport` adapts
Starlette's websocket (Ray Serve). An in-process front end (an OBS or VST bridge) can serve
clients by writing a third.

Slow readers: `backlog()` tells how much of what we sent is still queued in our own layer and
since when, so a client that never reads is closed on time instead of being hidden by a kernel send
buffer that grows to megabytes (the websockets adapter also fixes the socket's send buffer size).
"""

import socket
import time
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

SOCKET_SEND_BUFFER = 128 << 10  # bytes the kernel may hold per client (Linux doubles it) before our
# layer sees the backlog: ~0.7 s of 48 kHz f32le replies, so a client that stops reading shows soon


class TransportClosed(Exception):
    """The peer went away (cleanly or not): its session just ends."""


class Transport(Protocol):
    """One accepted websocket. `recv` and `send` raise `TransportClosed` once the peer is gone."""

    target: str  # the request path with its query (?token=)
    address: str  # the peer's IP address, "?" when unknown

    async def recv(self) -> str | bytes: ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None:
        """Close with `code`; waits for the peer's answer at most the transport's close timeout."""

    def abort(self) -> None:
        """Drop the connection now (a peer that reads nothing, not even a close frame)."""

    def backlog(self) -> tuple[int, float]:
        """(bytes we sent that are still queued in our layer, seconds the queue has been non-empty)."""


class WebsocketsTransport:
    """A `websockets` server connection as a `Transport`."""

    def __init__(self, connection: ServerConnection):
        self.connection = connection
        self.target = connection.request.path if connection.request is not None else "/"
        self.address = str((connection.remote_address or ("?",))[0])
        self._queued_since: float | None = None

    async def recv(self) -> str | bytes:
        try:
            return await self.connection.recv()
        except ConnectionClosed as err:
            # the connection keeps this exception: drop its traceback so our frames (and the
            # session) are freed now, not at the next garbage collection
            err.__traceback__ = None
            raise TransportClosed(str(err)) from None

    async def send(self, data: str | bytes) -> None:
        try:
            await self.connection.send(data)
        except ConnectionClosed as err:
            err.__traceback__ = None
            raise TransportClosed(str(err)) from None

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.connection.close(code, reason)
        except ConnectionClosed as err:
            err.__traceback__ = None
            raise TransportClosed(str(err)) from None

    def abort(self) -> None:
        self.connection.transport.abort()

    def backlog(self) -> tuple[int, float]:
        queued = self.connection.transport.get_write_buffer_size()
        now = time.monotonic()
        if not queued:
            self._queued_since = None
        elif self._queued_since is None:
            self._queued_since = now
        return queued, 0.0 if self._queued_since is None else now - self._queued_since


def limit_send_buffer(transport) -> None:
    """Fix a TCP socket's kernel send buffer (it no longer grows by auto-tuning)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)


__all__ = ["SOCKET_SEND_BUFFER", "Transport", "TransportClosed", "WebsocketsTransport", "limit_send_buffer"]
