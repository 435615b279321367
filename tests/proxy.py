"""A TCP proxy for tests: forwards bytes, or silently stops forwarding them (a network partition).

``stall()`` is what a partition looks like to both ends: every connection stays
open, new ones are still accepted, but no byte goes through in either
direction, and nobody gets an RST or a FIN. ``resume()`` forwards again,
including whatever was held back meanwhile. ``close()`` aborts every connection
(both ends see a reset at once) and stops listening.

The proxy runs an asyncio loop in a thread of its own, so it keeps working
while the test's thread (or the server's loop) is blocked::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        proxy.stall()
        ...
        proxy.resume()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 64 * 1024


class TcpProxy:
    """Listens on 127.0.0.1 (``port``; 0 picks a free one) and forwards to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Client end -> upstream end of each connection (the upstream end is None while connecting).
        self._connections: dict[asyncio.StreamWriter, asyncio.StreamWriter | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        try:
            self._server = self._run(asyncio.start_server(self._accepted, "127.0.0.1", port))
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """host:port to connect to instead of the target."""
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted and not yet closed."""
        return self._run(self._count())

    def stall(self) -> None:
        """Stops forwarding in both directions; connections stay open, new ones are accepted."""
        self._run(self._set_flowing(False))

    def resume(self) -> None:
        """Forwards again, starting with what was held back while stalled."""
        self._run(self._set_flowing(True))

    def close(self) -> None:
        """Stops listening and aborts every connection (an RST to both ends). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- on the proxy's loop --------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the proxy is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _count(self) -> int:
        return len(self._connections)

    async def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._connections[client_writer] = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            del self._connections[client_writer]
            client_writer.transport.abort()
            return
        self._connections[client_writer] = upstream_writer
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer, client_writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: asyncio.StreamWriter
    ) -> None:
        """One direction of one connection. When one end goes away the other is closed too
        (the reverse direction then sees EOF and closes the first end)."""
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # bytes read just before a stall are held until resume()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            upstream = self._connections.get(connection)
            if connection.is_closing() and (upstream is None or upstream.is_closing()):
                self._connections.pop(connection, None)

    async def _shutdown(self) -> None:
        self._server.close()
        for client, upstream in self._connections.items():
            for end in (client, upstream):
                if end is not None:
                    end.transport.abort()
        self._connections.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
