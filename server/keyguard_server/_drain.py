"""Graceful shutdown's one mechanism: every call that reached a handler is finished, or
answered UNAVAILABLE, before grpc's own shutdown can end it.

Why not grpc.aio's ``server.stop(grace)`` alone: it is two ways of losing calls.

- It starts with grpc core's shutdown, which closes the listener, sends GOAWAY, and kills
  every call that arrived (its HTTP/2 stream open) but that grpc.aio had not yet handed to a
  handler: under load, the calls of the last ~100 ms queue in core behind the busy event loop
  (grpc.aio takes them one at a time). The client sees CANCELLED, which it cannot safely
  retry (measured: 14-22 of 50 calls in flight).
- At the end of the grace it cancels every call still running, whatever the handler was
  doing (grpcio 1.85 tells the caller UNAVAILABLE "Cancelling all calls"), and only then the
  handlers' tasks, while their waits (argon2's queue, a database write) still run on.

So :meth:`Drain.drain` runs first, while grpc still serves. The calls grpc hands to a handler
in its first moments are served: they arrived before the signal and were queued in core (grpc
tells nobody when a call arrived, but it hands them over in order, and the backlog is worked
off once no call is handed over for QUIET_SECONDS, or at the latest after BACKLOG_SECONDS).
From then on calls are refused at once with UNAVAILABLE (retryable: :data:`SHUTTING_DOWN`), and
the load balancers that saw health go NOT_SERVING resend them elsewhere; the calls admitted run
on. Shortly before the grace ends, the handlers still running are cancelled and answer
UNAVAILABLE themselves. Only then is grpc stopped, with nothing left for it to kill (but a call
that reaches core in the moment between the last answer and GOAWAY: core's shutdown kills it,
and nothing in grpc.aio can answer it).

A stream is never ended while its caller is still sending, where that can be helped: a
refused stream's messages are read (and dropped) until its caller pauses, half-closes, or
CALLER_PAUSE_SECONDS pass, and only then answered UNAVAILABLE. grpc.aio's client (1.85; grpc
issue 36066) turns a write that fails because the server ended the call into INTERNAL
("Internal error from Core", 'Failed "execute_batch": (<...SendMessageOperation ...>,)'),
overwriting the status the server sent whenever it sees the failed write first.
(AuthorizeStream's streams do the same when the shutdown ends them: see _stream.)

Health is never refused while draining: it is how load balancers learn to stop sending (its
status is NOT_SERVING from the signal on). Its watches never end on their own, so they are not
waited for: they are ended with the rest.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc

SHUTTING_DOWN = "server shutting down; send the call again (to another server)"
# Before the grace ends, time kept for the handlers still running to answer UNAVAILABLE.
ANSWER_SECONDS = 0.1
# grpc's backlog is worked off once no call was handed to a handler for this long: calls from
# then on are new, and refused; the drain ends once none is running either.
QUIET_SECONDS = 0.02
# The longest the backlog is taken for one: a client sending without pause is refused from
# then on (the calls queued at the signal took ~50-100 ms to be handed over under load).
BACKLOG_SECONDS = 0.25
_POLL_SECONDS = 0.005
# A stream ended by the shutdown is first read until its caller sent nothing for this long
# (a client's writes in one burst follow each other within a few ms, even under load)...
CALLER_QUIET_SECONDS = 0.05
# ...or, for one that never pauses, for at most this long: then it is ended all the same.
CALLER_PAUSE_SECONDS = 0.25


class Drain:
    """Tracks the task of every call in a handler; :meth:`drain` ends them all, answered."""

    def __init__(self) -> None:
        self.closing = False  # draining: calls are timed (and refused once ``refusing``)
        self.refusing = False
        self._calls: set[asyncio.Task[Any]] = set()  # admitted calls, waited for
        self._lingering: set[asyncio.Task[Any]] = set()  # health calls: answered during the drain, not waited for
        self._ending: set[asyncio.Task[Any]] = set()  # cancelled by the drain: they answer UNAVAILABLE
        self._last_call = 0.0  # when a handler last got a call, while draining

    def tracking(self, handler: grpc.RpcMethodHandler[Any, Any], *, lingers: bool) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler``, its calls tracked; refused with UNAVAILABLE once the drain began, unless
        ``lingers`` (health: answered while draining, ended with the rest, never waited for)."""
        field = "_".join(
            "stream" if streaming else "unary" for streaming in (handler.request_streaming, handler.response_streaming)
        )
        behaviour: Any = getattr(handler, field)  # typeshed types behaviours as sync
        calls = self._lingering if lingers else self._calls
        sending = handler.request_streaming  # a refused caller may still be sending
        if inspect.isasyncgenfunction(behaviour):

            @functools.wraps(behaviour)
            async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                task = cast("asyncio.Task[Any]", asyncio.current_task())
                calls.add(task)  # a refused stream too, while its caller is read: the drain waits for it
                try:
                    if self.closing:
                        await self._while_draining(context, lingers, sending)
                    async for response in behaviour(request, context):
                        yield response
                except asyncio.CancelledError:
                    await self._answer_ended(task, context)
                finally:
                    calls.discard(task)

            tracked: Callable[..., Any] = each
        elif inspect.iscoroutinefunction(behaviour):

            @functools.wraps(behaviour)  # keeps its name for logs and traces
            async def whole(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                task = cast("asyncio.Task[Any]", asyncio.current_task())
                calls.add(task)  # a refused stream too, while its caller is read: the drain waits for it
                try:
                    if self.closing:
                        await self._while_draining(context, lingers, sending)
                    return await behaviour(request, context)
                except asyncio.CancelledError:
                    await self._answer_ended(task, context)
                finally:
                    calls.discard(task)

            tracked = whole
        else:
            raise TypeError(f"{behaviour!r}: only async methods (coroutines, async generators) are served")
        kind: Any = type(handler)
        values = {**cast(Any, handler)._asdict(), field: tracked}
        wrapped: grpc.RpcMethodHandler[Any, Any] = kind(**values)
        return wrapped

    async def _while_draining(self, context: grpc.aio.ServicerContext[Any, Any], lingers: bool, sending: bool) -> None:
        self._last_call = time.monotonic()
        if self.refusing and not lingers:
            if sending:
                await caller_paused(context)
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _answer_ended(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A cancelled call: UNAVAILABLE if the drain ended it, else (its caller is gone, or
        grpc cancelled it) the cancellation goes on."""
        if task not in self._ending:
            raise asyncio.CancelledError
        task.uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def drain(self, grace: float) -> None:
        """Serves grpc's backlog, then refuses calls; waits (at most ``grace`` seconds, less
        ANSWER_SECONDS) for the calls admitted to end, then has every call still in a handler
        answer UNAVAILABLE. Call once; grpc is stopped after."""
        self.closing = True
        started = self._last_call = time.monotonic()
        cutoff = started + max(0.0, grace - ANSWER_SECONDS)
        backlog_until = min(cutoff, started + BACKLOG_SECONDS)
        while (now := time.monotonic()) < cutoff:
            quiet = now - self._last_call >= QUIET_SECONDS
            if not self.refusing and (quiet or now >= backlog_until):
                self.refusing = True
            if self.refusing and quiet and not self._calls:
                break
            await asyncio.sleep(_POLL_SECONDS)
        self.refusing = True
        left = [*self._calls, *self._lingering]
        for task in left:
            self._ending.add(task)
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=ANSWER_SECONDS)


async def caller_paused(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Reads, and drops, what the caller of a stream about to be ended sends, until it half-closes
    (or reading fails), sends nothing for CALLER_QUIET_SECONDS, or CALLER_PAUSE_SECONDS pass:
    the status then reaches a caller that is not in a write (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + CALLER_PAUSE_SECONDS
    read = asyncio.ensure_future(context.read())
    try:
        while (left := until - loop.time()) > 0:
            done, _ = await asyncio.wait((read,), timeout=min(CALLER_QUIET_SECONDS, left))
            if not done or read.cancelled() or read.exception() is not None or read.result() is grpc.aio.EOF:
                return
            read = asyncio.ensure_future(context.read())
    finally:
        read.cancel()  # the call ends next: its pending read with it
