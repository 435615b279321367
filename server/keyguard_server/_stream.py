"""AuthorizeStream's contract: many requests on one stream, decided concurrently, bounded.

- A message that can be decided without waiting (a cached secret on SQLite) is decided and
  answered as it is read, by the stream's reader, with no task of its own; any other starts
  its decision at once, as a task (the coroutine ``answer`` returned). Answers are written as
  soon as they are decided, in whatever order decisions end, so an argon2 verification
  never holds up the cached messages behind it.
- At most ``max_in_flight`` messages per stream are between "read" and "answer
  written". At that many the stream is not read: HTTP/2 flow control then holds
  the sender back, and neither decisions nor answers waiting for a slow reader
  pile up in the server.
- The stream ends once every message read has been answered: when the caller
  half-closes (OK), when reading fails (that error, e.g. a message that does not
  parse), or when the server stops (UNAVAILABLE, see :meth:`StreamDecider.stop`). A stream
  the server stops is ended once its caller pauses: what it sends from the stop on is read
  but never decided, so that the status does not meet a write of the caller's (see _drain:
  grpc.aio's client would report such a call INTERNAL).
  Only cancellation (the caller's, or a shutdown whose grace ran out) or a write that
  fails (the caller is gone) drops answers; a message without an answer was otherwise
  never decided. Either ends the call as cancelled, which is no error: nothing is logged
  above DEBUG.
- The RPC latency histogram is observed per message (read to answer ready), not
  per stream: a stream lives for hours.

Why not an async generator of answers with a task per message: that machinery (a task,
a queue and three generator hand-overs per message) cost more CPU than the decision and
grpcio's own work on the message together.

Knows nothing of keyguard's messages: the servicer passes the functions that answer one
message (they never raise; errors are answers too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import grpc

from keyguard_server._drain import CALLER_PAUSE_SECONDS, CALLER_QUIET_SECONDS
from keyguard_server._metrics import RPC_SECONDS

log = logging.getLogger("keyguard.stream")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

SHUTTING_DOWN = (
    "server shutting down: every message it decided has been answered; send the others again on a new stream"
)


class _Stream(Generic[Resp]):
    """One stream's state; everything runs on the loop, so no step races another."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], max_in_flight: int, observe: Any) -> None:
        self.context = context
        self.max_in_flight = max_in_flight
        self.observe = observe
        self.in_flight = 0  # read, answer not yet written
        self.backlog: collections.deque[Resp] = collections.deque()  # decided while another answer was written
        self.writing = False
        self.reading = True  # until the caller half-closes, reading fails, or the stream stops
        self.stopping = False  # decide no more
        self.stopped = False  # by the server's shutdown
        self.stopped_at = 0.0  # when (time.monotonic())
        self.last_read = 0.0  # when a message was last read once stopped (read, not decided)
        self.in_read = False  # the reader awaits a message: only then is it cancelled to stop
        self.reader: asyncio.Task[None] | None = None
        self.room: asyncio.Future[None] | None = None  # the reader waits for in_flight to drop
        self.failure: BaseException | None = None
        self.broken = False  # a write failed: nothing more can be answered
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def write(self, response: Resp, started: float) -> None:
        """Writes an answer counted in ``in_flight``: now, or (while another is being written)
        from the backlog by that writer, before it returns."""
        self.observe(time.perf_counter() - started)
        if self.writing:
            self.backlog.append(response)
            return
        self.writing = True
        try:
            while True:
                await self.context.write(response)
                self._answered()
                if not self.backlog:
                    break
                response = self.backlog.popleft()
        except Exception as exc:  # the call ended under us (the caller went away)
            self.broken = True
            self.fail(exc)
        finally:
            self.writing = False
            if not self.reading or self.broken:
                self.check_end()

    def _answered(self) -> None:
        self.in_flight -= 1
        if self.room is not None and not self.room.done():
            self.room.set_result(None)

    def unanswered(self, exc: BaseException) -> None:
        """A decision raised, which it must not: its message stays unanswered, the stream ends with the error."""
        self._answered()
        self.fail(exc)
        self.check_end()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.stop_reading()

    def stop_reading(self) -> None:
        self.stopping = True
        if self.in_read and self.reader is not None:
            self.reader.cancel()
        if self.room is not None and not self.room.done():
            self.room.set_result(None)

    def shut(self) -> None:
        """The server's shutdown: no message is decided from now on, and the stream ends once those
        decided are answered and the caller paused (:meth:`caller_paused`). The reader is not
        cancelled: it reads on, deciding nothing, so that the caller's writes complete. (A read
        cancelled mid-way leaves grpc core's receive pending, and a second read then fails at
        once: _drain's caller_paused, reading anew, would see no pause at all.)"""
        self.stopped = True
        self.stopped_at = self.last_read = time.monotonic()
        self.stopping = True
        self.reading = False  # decides no more
        if self.room is not None and not self.room.done():
            self.room.set_result(None)
        self.check_end()

    async def caller_paused(self) -> None:
        """Once stopped: returns when the caller half-closed (or reading failed), or sent nothing
        for CALLER_QUIET_SECONDS, or at the latest CALLER_PAUSE_SECONDS after the stop."""
        while self.reader is not None and not self.reader.done():
            now = time.monotonic()
            wake = min(self.last_read + CALLER_QUIET_SECONDS, self.stopped_at + CALLER_PAUSE_SECONDS)
            if now >= wake:
                return
            await asyncio.sleep(wake - now)

    def check_end(self) -> None:
        if self.ended.done():
            return
        if self.broken or (not self.reading and not self.in_flight and not self.writing):
            self.ended.set_result(None)


class StreamDecider:
    """Serves the streams of one streaming method; :meth:`stop` ends them all, answered."""

    def __init__(self, max_in_flight: int, method: str) -> None:
        self._max_in_flight = max_in_flight
        self._method = method
        self._observe = RPC_SECONDS.labels(method).observe
        self._streams: set[_Stream[Any]] = set()
        self._stopping = False

    def stop(self) -> None:
        """The server is shutting down: every stream stops deciding, answers what it decided and
        ends with UNAVAILABLE once its caller paused (see :meth:`_Stream.shut`); streams that start
        from now on decide nothing and end so."""
        self._stopping = True
        for stream in self._streams:
            stream.shut()

    async def serve(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        answer: Callable[[Req], Resp | Coroutine[Any, Any, Resp]],
    ) -> None:
        """Answers the requests read on ``context`` (grpc's reader-writer API: ``read`` and
        ``write``), each with what ``answer`` returns, or when that is a coroutine, with what it
        returns when awaited. Raises what reading raised."""
        stream: _Stream[Resp] = _Stream(context, self._max_in_flight, self._observe)
        if self._stopping:  # it decides nothing, and ends UNAVAILABLE once its caller paused
            stream.shut()
        decisions: set[asyncio.Task[None]] = set()

        async def decide(later: Coroutine[Any, Any, Resp], started: float) -> None:
            try:
                response = await later
            except Exception as exc:
                stream.unanswered(exc)
                return
            await stream.write(response, started)

        async def read() -> None:
            loop = asyncio.get_running_loop()
            perf_counter = time.perf_counter
            ended = False  # the caller half-closed
            try:
                while not stream.stopping:
                    if stream.in_flight >= stream.max_in_flight:  # no room, no read: the backpressure
                        stream.room = loop.create_future()
                        await stream.room
                        continue
                    stream.in_read = True
                    try:
                        request = await context.read()
                    finally:
                        stream.in_read = False
                    if request is grpc.aio.EOF:  # the caller half-closed
                        ended = True
                        break
                    if stream.stopping:  # stopped while reading it: not decided
                        stream.last_read = time.monotonic()
                        break
                    started = perf_counter()
                    response = answer(request)
                    # No await from here to the write or the task's creation: a message read is a message decided.
                    stream.in_flight += 1
                    if isinstance(response, Coroutine):
                        task = asyncio.create_task(decide(response, started))
                        decisions.add(task)
                        task.add_done_callback(decisions.discard)
                    else:
                        await stream.write(response, started)
                if stream.stopped and not ended:
                    # Shut down: what the caller still sends is read, never decided, until the stream ends.
                    with contextlib.suppress(Exception):  # a message that fails to parse: not decided either
                        while await context.read() is not grpc.aio.EOF:
                            stream.last_read = time.monotonic()
            except asyncio.CancelledError:
                if not stream.stopping:
                    raise
            except Exception as exc:  # the handler raises it, once the messages read are answered
                stream.fail(exc)
            finally:
                stream.reading = False
                stream.check_end()

        self._streams.add(stream)
        stream.reader = asyncio.create_task(read())
        try:
            await stream.ended
            if stream.broken:
                # A write failed: the call is over (its caller cancelled it, went away, or its deadline
                # passed), with nothing left to answer or report. That is how streams end, not an
                # error: the write's exception, raised, was grpc's ERROR traceback whenever grpc had
                # not yet seen the cancellation itself. Ended as cancelled, it is grpc's one DEBUG line.
                log.debug("%s: a write failed (the caller is gone): %s", self._method, stream.failure)
                raise asyncio.CancelledError
            if stream.failure is not None:
                raise stream.failure
            if stream.stopped:
                await stream.caller_paused()
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(SHUTTING_DOWN)
        finally:
            self._streams.discard(stream)
            stream.reader.cancel()
            for task in decisions:
                task.cancel()
