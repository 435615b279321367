"""AuthorizeStream's contract: many requests on one stream, decided concurrently, bounded.

- Every message read starts its decision at once, as a task of its own; its
  answer is written as soon as it is decided, in whatever order decisions end,
  so an argon2 verification never holds up the cached messages behind it.
- At most ``max_in_flight`` messages per stream are between "read" and "answer
  written". At that many the stream is not read: HTTP/2 flow control then holds
  the sender back, and neither decisions nor answers waiting for a slow reader
  pile up in the server.
- The stream ends once every message read has been answered: when the caller
  half-closes (OK), when reading fails (that error, e.g. a message that does not
  parse), or when the server stops (UNAVAILABLE, see :meth:`StreamDecider.stop`).
  Only cancellation (the caller's, or a shutdown whose grace ran out) drops
  decisions in flight; a message without an answer was otherwise never read.
- The RPC latency histogram is observed per message (read to answer ready), not
  per stream: a stream lives for hours.

Knows nothing of keyguard's messages: the servicer passes the function that
answers one message (it never raises; errors are answers too).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from keyguard_server._metrics import RPC_SECONDS

Req = TypeVar("Req")
Resp = TypeVar("Resp")

SHUTTING_DOWN = "server shutting down: every message it read has been answered; send the others again on a new stream"


@dataclass
class _Answer(Generic[Resp]):
    response: Resp
    started: float


@dataclass
class _ReadEnded:
    """The reader is done: the caller half-closed (``error`` None) or reading failed."""

    error: BaseException | None


@dataclass
class _Unanswered:
    """``answer`` raised, which it must not: the stream ends with the error."""

    error: Exception


class _Stop:
    pass


class _Stream(Generic[Resp]):
    """One stream's events (answers, end of reading, stop), consumed by its handler task only."""

    def __init__(self, max_in_flight: int) -> None:
        self.events: asyncio.Queue[_Answer[Resp] | _ReadEnded | _Unanswered | _Stop] = asyncio.Queue()
        self.slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0  # read, answer not yet written

    def stop(self) -> None:
        self.events.put_nowait(_Stop())


class StreamDecider:
    """Serves the streams of one streaming method; :meth:`stop` ends them all, answered."""

    def __init__(self, max_in_flight: int, method: str) -> None:
        self._max_in_flight = max_in_flight
        self._latency = RPC_SECONDS.labels(method)
        self._streams: set[_Stream[Any]] = set()
        self._stopping = False

    def stop(self) -> None:
        """The server is shutting down: every stream stops reading, answers what it has read and
        ends with UNAVAILABLE; streams that start from now on end so at once."""
        self._stopping = True
        for stream in self._streams:
            stream.stop()

    async def serve(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext[Any, Any],
        answer: Callable[[Req], Awaitable[Resp]],
    ) -> AsyncGenerator[Resp, None]:
        """The answers to ``requests``, each as soon as ``answer`` gives it."""
        if self._stopping:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(SHUTTING_DOWN)
            return
        stream: _Stream[Resp] = _Stream(self._max_in_flight)
        decisions: set[asyncio.Task[None]] = set()

        async def decide(request: Req, started: float) -> None:
            try:
                stream.events.put_nowait(_Answer(await answer(request), started))
            except Exception as exc:  # answer() maps errors: a bug, which ends the stream
                stream.events.put_nowait(_Unanswered(exc))

        async def read() -> None:
            try:
                while True:
                    await stream.slots.acquire()  # no slot, no read: the backpressure
                    try:
                        request = await anext(requests)
                    except BaseException:
                        stream.slots.release()
                        raise
                    # No await from here to the task's creation: a message read is a message decided.
                    stream.in_flight += 1
                    task = asyncio.create_task(decide(request, time.perf_counter()))
                    decisions.add(task)
                    task.add_done_callback(decisions.discard)
            except StopAsyncIteration:
                stream.events.put_nowait(_ReadEnded(None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the handler task raises it
                stream.events.put_nowait(_ReadEnded(exc))

        self._streams.add(stream)
        reader = asyncio.create_task(read())
        reading, stopped, failure = True, False, None
        try:
            while reading or stream.in_flight:
                event = await stream.events.get()
                if isinstance(event, _Answer):
                    self._latency.observe(time.perf_counter() - event.started)
                    yield event.response  # returns once the answer is written
                    stream.in_flight -= 1
                    stream.slots.release()
                elif isinstance(event, _ReadEnded):
                    reading, failure = False, failure or event.error
                elif isinstance(event, _Unanswered):
                    stream.in_flight -= 1
                    stream.slots.release()
                    reader.cancel()
                    reading, failure = False, failure or event.error
                elif reading:  # _Stop
                    reader.cancel()
                    reading, stopped = False, True
            if failure is not None:
                raise failure
            if stopped:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(SHUTTING_DOWN)
        finally:
            self._streams.discard(stream)
            reader.cancel()
            for task in decisions:
                task.cancel()
