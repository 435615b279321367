"""AuthorizeStream: many Authorize requests on one stream, answered by id as each is decided,
bounded per stream, checked once per stream, ended cleanly on shutdown; and the Python client's
StreamingAuthorizer that multiplexes threads over a few streams."""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from keyguard import (
    AuthorizeResult,
    Client,
    CreatedKey,
    Decision,
    InvalidArgument,
    KeyguardError,
    ServerError,
    Unauthenticated,
    Unavailable,
    WithdrawalDestination,
)
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._callers import token_sha256
from keyguard_server._config import Caller, Role
from keyguard_server._drain import SHUTTING_DOWN as DRAIN_SHUTTING_DOWN
from keyguard_server._secrets import new_private_key
from keyguard_server._stream import SHUTTING_DOWN
from keyguard_server.authorize._domain import Query
from tests.conftest import LoopThread, RawStubs, RunningServer, StartServer
from tests.processes import ServeProcess

BOT_IP = "203.0.113.7"
WRONG = new_private_key()  # well-formed: only argon2 can tell it is wrong
# Slow enough that cached answers can overtake an uncached one (a few hundred ms per run).
SLOW_ARGON2 = {"argon2_time_cost": 6, "argon2_memory_kib": 65536, "argon2_parallelism": 1}
METHOD = "/keyguard.v1.Authorization/AuthorizeStream"


def request(
    key: CreatedKey | None,
    permission: pb.Permission.ValueType = pb.PERMISSION_READ,
    *,
    secret: str | None = None,
    ip: str = BOT_IP,
    access_key: str | None = None,
    destination: pb.WithdrawalDestination | None = None,
) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        access_key=access_key if access_key is not None else key.key.access_key if key else "",
        private_key=secret if secret is not None else key.private_key if key else "",
        client_ip=ip,
        required_permission=permission,
        destination=destination,
    )


def stream(raw: RawStubs, messages: Iterable[pb.AuthorizeStreamRequest]) -> list[pb.AuthorizeStreamResponse]:
    """Every answer, in the order they arrived; the stream ends when the messages do."""
    return list(raw.auth.AuthorizeStream(iter(messages), metadata=raw.metadata, timeout=30))


def by_id(answers: list[pb.AuthorizeStreamResponse]) -> dict[int, pb.AuthorizeStreamResponse]:
    mapped = {a.id: a for a in answers}
    assert len(mapped) == len(answers), "an id was answered twice"
    return mapped


def as_status(error: pb.RpcStatus) -> status_pb2.Status:
    """RpcStatus is google.rpc.Status on the wire: its bytes parse as one."""
    return status_pb2.Status.FromString(error.SerializeToString())


def unary_status(raw: RawStubs, req: pb.AuthorizeRequest) -> status_pb2.Status:
    with pytest.raises(grpc.RpcError) as caught:
        raw.auth.Authorize(req, metadata=raw.metadata, timeout=10)
    status: status_pb2.Status | None = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    return status


class Sender:
    """A stream fed from a queue, read by the test: for messages sent over time."""

    def __init__(self, stub: pb_grpc.AuthorizationStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._outgoing: queue.SimpleQueue[pb.AuthorizeStreamRequest | None] = queue.SimpleQueue()
        self.call = stub.AuthorizeStream(iter(self._outgoing.get, None), metadata=metadata, timeout=30)

    def send(self, message_id: int, req: pb.AuthorizeRequest) -> None:
        self._outgoing.put(pb.AuthorizeStreamRequest(id=message_id, request=req))

    def close(self) -> None:
        self._outgoing.put(None)

    def __next__(self) -> pb.AuthorizeStreamResponse:
        return next(self.call)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


# -- the protocol ---------------------------------------------------------------


def test_each_message_gets_the_answer_authorize_gives_and_errors_do_not_end_the_stream(
    raw: RawStubs, client: Client, account: str
) -> None:
    trade = client.create_key(account, "trader", "trade", [BOT_IP])
    whitelisted = pb.WithdrawalDestination(asset="BTC", address="bc1qcold")
    malformed = request(None, pb.PERMISSION_WITHDRAW, access_key="", ip="not-an-ip")
    requests = {
        10: request(trade, pb.PERMISSION_TRADE),
        11: request(trade, pb.PERMISSION_WITHDRAW, destination=whitelisted),
        12: request(trade, secret=WRONG),
        13: request(trade, ip="198.51.100.1"),
        14: request(None, access_key="kg_" + "x" * 24),
        15: malformed,
        16: request(trade, pb.PERMISSION_READ),  # after the malformed one: the stream goes on
        2**64 - 1: request(trade, pb.PERMISSION_TRADE),  # every uint64 is an id
    }
    answers = by_id(stream(raw, (pb.AuthorizeStreamRequest(id=i, request=r) for i, r in requests.items())))
    assert set(answers) == set(requests)
    for message_id, req in requests.items():
        answer = answers[message_id]
        if req is malformed:
            assert answer.WhichOneof("result") == "error"
            continue
        assert answer.WhichOneof("result") == "response"
        assert answer.response == raw.call(raw.auth.Authorize, req), message_id
    assert answers[10].response.decision == pb.DECISION_ALLOW
    assert answers[10].response.key_name == "trader"
    assert answers[11].response.decision == pb.DECISION_PERMISSION_DENIED
    assert answers[12].response.decision == pb.DECISION_BAD_SECRET
    assert answers[13].response.decision == pb.DECISION_IP_NOT_ALLOWED
    assert answers[14].response.decision == pb.DECISION_UNKNOWN_KEY
    # The malformed message: the very status (code, message, BadRequest) the unary call fails with.
    error = as_status(answers[15].error)
    assert error == unary_status(raw, malformed)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert error.details[0].Unpack(bad_request)
    assert {v.field for v in bad_request.field_violations} == {"access_key", "client_ip", "destination"}


def test_an_empty_message_is_a_malformed_request_for_its_id(raw: RawStubs) -> None:
    (answer,) = stream(raw, [pb.AuthorizeStreamRequest(id=7)])
    assert answer.id == 7
    assert as_status(answer.error) == unary_status(raw, pb.AuthorizeRequest())


def test_a_message_that_does_not_parse_ends_the_stream_after_answering_the_others(
    channel: grpc.Channel, server: RunningServer, client: Client, account: str
) -> None:
    key = client.create_key(account, "bot", "read", [BOT_IP])
    good = pb.AuthorizeStreamRequest(id=1, request=request(key)).SerializeToString()
    raw_stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    call = raw_stream(iter([good, b"\xff\xff\xff"]), metadata=(("authorization", f"Bearer {server.admin_token}"),))
    answer = pb.AuthorizeStreamResponse.FromString(next(call))
    assert (answer.id, answer.response.decision) == (1, pb.DECISION_ALLOW)
    with pytest.raises(grpc.RpcError):
        next(call)
    assert call.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in (call.details() or "")


def test_the_timeout_of_a_message_bounds_its_argon2_wait(start_server: StartServer, account: str) -> None:
    server = start_server(**SLOW_ARGON2)
    with server.client() as client, grpc.insecure_channel(server.target) as ch:
        key = client.create_key(account, "bot", "read", [BOT_IP])
        raw = RawStubs(ch, server.admin_token)
        hurried = pb.AuthorizeStreamRequest(id=1, request=request(key), timeout_ms=20)
        patient = pb.AuthorizeStreamRequest(id=2, request=request(key), timeout_ms=10_000)
        assert [(a.id, a.response.decision) for a in stream(raw, [hurried])] == [(1, pb.DECISION_VERIFICATION_BUSY)]
        assert [(a.id, a.response.decision) for a in stream(raw, [patient])] == [(2, pb.DECISION_ALLOW)]


# -- concurrency ------------------------------------------------------------------


def test_an_uncached_verification_never_holds_up_the_cached_messages_behind_it(
    start_server: StartServer, account: str
) -> None:
    server = start_server(**SLOW_ARGON2)
    with server.client() as client, grpc.insecure_channel(server.target) as ch:
        cold = client.create_key(account, "cold", "read", [BOT_IP])
        warm = client.create_key(account, "warm", "read", [BOT_IP])
        started = time.monotonic()
        assert client.authorize(warm.key.access_key, warm.private_key, BOT_IP, "read").allowed  # now cached
        argon2_seconds = time.monotonic() - started
        assert argon2_seconds > 0.1, "argon2 was too fast for this test to mean anything"
        messages = [pb.AuthorizeStreamRequest(id=0, request=request(cold))]
        messages += [pb.AuthorizeStreamRequest(id=i, request=request(warm)) for i in range(1, 6)]
        answers = stream(RawStubs(ch, server.admin_token), messages)
    # The cached answers came first, though sent after the uncached one, which was decided all the same.
    assert sorted(a.id for a in answers[:5]) == [1, 2, 3, 4, 5]
    assert answers[5].id == 0
    assert {a.response.decision for a in answers} == {pb.DECISION_ALLOW}


def test_decisions_in_flight_per_stream_never_exceed_the_bound(
    start_server: StartServer, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch, account: str
) -> None:
    server = start_server(authorize_stream_max_in_flight=4)
    authorizer = server.server.authorizer
    assert authorizer is not None
    decide = authorizer.decide
    in_flight, peak = 0, 0

    async def counted(query: Query) -> AuthorizeResult:  # runs on the server's loop: no races
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)  # a decision that takes a while
            decided = decide(query)
            return decided if isinstance(decided, AuthorizeResult) else await decided
        finally:
            in_flight -= 1

    with server.client() as client, grpc.insecure_channel(server.target) as ch:
        key = client.create_key(account, "bot", "read", [BOT_IP])
        monkeypatch.setattr(authorizer, "decide", counted)  # every message waits
        raw = RawStubs(ch, server.admin_token)
        # The sender pushes 200 messages as fast as gRPC takes them; the server reads 4 at a time.
        answers = stream(raw, (pb.AuthorizeStreamRequest(id=i, request=request(key)) for i in range(200)))
        assert sorted(a.id for a in answers) == list(range(200))
        assert {a.response.decision for a in answers} == {pb.DECISION_ALLOW}
        assert peak == 4
        # The bound is per stream: two streams at once decide up to 8.
        peak = 0
        with ThreadPoolExecutor(2) as pool:
            both = list(
                pool.map(
                    lambda _: stream(raw, (pb.AuthorizeStreamRequest(id=i, request=request(key)) for i in range(100))),
                    range(2),
                )
            )
        assert [len(answers) for answers in both] == [100, 100]
        assert 4 < peak <= 8


def test_every_message_is_timed_and_counted_like_a_unary_call(raw: RawStubs, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "read", [BOT_IP])

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    timed = ("keyguard_rpc_duration_seconds_count", {"method": METHOD})
    allowed = ("keyguard_authorize_decisions_total", {"decision": "ALLOW"})
    before = sample(*timed), sample(*allowed)
    stream(raw, (pb.AuthorizeStreamRequest(id=i, request=request(key)) for i in range(25)))
    assert (sample(*timed), sample(*allowed)) == (before[0] + 25, before[1] + 25)


# -- callers ------------------------------------------------------------------------

GATEWAY_TOKEN = "kgt_gateway-token-for-stream-tests"
WEBSITE_TOKEN = "kgt_website-token-for-stream-tests"


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("kgt_not-a-configured-token-at-all", grpc.StatusCode.UNAUTHENTICATED),
        (WEBSITE_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_a_refused_caller_gets_the_status_when_the_stream_starts(
    start_server: StartServer, token: str | None, code: grpc.StatusCode
) -> None:
    server = start_server(
        callers=(
            Caller("gateway", Role.AUTHORIZER, token_sha256=token_sha256(GATEWAY_TOKEN)),
            Caller("website", Role.MANAGER, token_sha256=token_sha256(WEBSITE_TOKEN)),
        )
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        never = threading.Event()

        def silent() -> Iterator[pb.AuthorizeStreamRequest]:
            never.wait()
            yield from ()

        # The stream sends nothing: the refusal cannot have waited for a message.
        call = stub.AuthorizeStream(silent(), metadata=metadata, timeout=10)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
        never.set()
        assert refused.value.code() is code
        assert time.monotonic() - started < 5
        # The authorizer's stream is admitted once and then serves message after message.
        gateway = RawStubs(ch, GATEWAY_TOKEN)
        answers = stream(gateway, (pb.AuthorizeStreamRequest(id=i, request=request(None)) for i in range(3)))
        assert [a.error.code for a in answers] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3


# -- shutdown ---------------------------------------------------------------------


def test_stop_answers_what_the_stream_read_and_ends_it_within_the_grace(
    start_server: StartServer, loop_thread: LoopThread, account: str
) -> None:
    server = start_server(**SLOW_ARGON2)
    with server.client() as client, grpc.insecure_channel(server.target) as ch:
        key = client.create_key(account, "bot", "read", [BOT_IP])
        sender = Sender(pb_grpc.AuthorizationStub(ch), (("authorization", f"Bearer {server.admin_token}"),))
        sender.send(1, request(key))  # uncached: argon2 runs for a while
        time.sleep(0.05)
        stopping = time.monotonic()
        stopper = threading.Thread(target=loop_thread.run, args=(server.server.stop(5.0),))
        stopper.start()
        answer = next(sender)
        answered = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            next(sender)
        stopper.join(10)
        stopped = time.monotonic()
        sender.close()
    assert (answer.id, answer.response.decision) == (1, pb.DECISION_ALLOW)
    assert answered > stopping + 0.05, "the decision was not in flight when the server stopped"
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == SHUTTING_DOWN
    assert not stopper.is_alive()
    assert stopped - stopping < 4, "the stream held the server for its whole grace"


BURST = 20  # messages a caller writes at once


def burst_message(i: int) -> pb.AuthorizeStreamRequest:
    return pb.AuthorizeStreamRequest(id=i, request=request(None))  # decided at once: INVALID_ARGUMENT


async def burst_then_end(call: Any, first: int = 0) -> tuple[grpc.StatusCode, str, str]:
    """Writes messages ``first`` to BURST on a grpc.aio stream, never half-closing it (as a
    gateway), then reads it to its end: its code, details and debug error string."""
    try:
        for i in range(first, BURST):
            await call.write(burst_message(i))
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the stream ended before all was sent: its status says how
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
        return await call.code(), await call.details(), await call.debug_error_string()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", exc.debug_error_string() or ""


def test_a_stream_whose_caller_is_writing_as_the_server_stops_ends_unavailable_not_internal(
    start_server: StartServer, loop_thread: LoopThread
) -> None:
    """grpc.aio's client reports a write that fails because the server ended the call as INTERNAL
    ("Internal error from Core"), over the UNAVAILABLE the server sent, whenever it sees the
    failed write first (grpc issue 36066). So a stream the shutdown ends is read, deciding
    nothing, until its caller pauses: then its caller's writes have all completed."""
    server = start_server()
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    streams = 16

    async def writing_as_the_server_stops() -> list[tuple[grpc.StatusCode, str, str]]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            auth: Any = pb_grpc.AuthorizationStub(ch)
            calls = [auth.AuthorizeStream(metadata=metadata, timeout=30) for _ in range(streams)]
            for call in calls:  # each in its handler before the stop
                await call.write(burst_message(0))
                assert (await call.read()).id == 0
            stopping = asyncio.get_running_loop().run_in_executor(None, loop_thread.run, server.server.stop(5.0))
            ends = await asyncio.gather(*(burst_then_end(call, 1) for call in calls))
            await stopping
        return ends

    ends = asyncio.run(writing_as_the_server_stops())
    assert [end[:2] for end in ends] == [(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)] * streams, collections.Counter(
        ends
    )


def test_a_stream_refused_while_draining_is_read_until_its_caller_pauses(
    start_server: StartServer, loop_thread: LoopThread, account: str
) -> None:
    """The same for streams that arrive once the drain refuses calls: refused (UNAVAILABLE) once
    their caller paused, never INTERNAL."""
    server = start_server(**SLOW_ARGON2)
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    streams = 16
    with server.client() as client, grpc.insecure_channel(server.target) as ch:
        key = client.create_key(account, "bot", "read", [BOT_IP])
        holder = Sender(pb_grpc.AuthorizationStub(ch), metadata)
        holder.send(1, request(key))  # uncached: argon2 holds the drain open for a while
        time.sleep(0.05)
        stopper = threading.Thread(target=loop_thread.run, args=(server.server.stop(5.0),))
        stopper.start()
        time.sleep(0.1)  # the drain refuses calls from now on

        async def refused() -> list[tuple[grpc.StatusCode, str, str]]:
            async with grpc.aio.insecure_channel(server.target) as aio_ch:
                auth: Any = pb_grpc.AuthorizationStub(aio_ch)
                calls = [auth.AuthorizeStream(metadata=metadata, timeout=30) for _ in range(streams)]
                return await asyncio.gather(*(burst_then_end(call) for call in calls))

        assert server.server._drain.refusing and server.server._drain._calls, "not refusing, or nothing in flight"
        ends = asyncio.run(refused())
        stopper.join(10)
        holder.close()
    assert [end[:2] for end in ends] == [(grpc.StatusCode.UNAVAILABLE, DRAIN_SHUTTING_DOWN)] * streams, (
        collections.Counter(ends)
    )


def test_sigterm_lets_streams_finish_and_the_client_then_raises_unavailable(tmp_path: Path) -> None:
    slow = {
        "KEYGUARD_ARGON2_TIME_COST": str(SLOW_ARGON2["argon2_time_cost"]),
        "KEYGUARD_ARGON2_MEMORY_KIB": str(SLOW_ARGON2["argon2_memory_kib"]),
        "KEYGUARD_ARGON2_PARALLELISM": "1",
        "KEYGUARD_SHUTDOWN_GRACE": "10",
    }
    server = ServeProcess(tmp_path, env=slow)
    try:
        with server.client() as client:
            key = client.create_key("acct-stream-drain", "bot", "read", [BOT_IP])
            authorizer = client.authorizer(streams=1)
            results: list[AuthorizeResult] = []
            worker = threading.Thread(
                target=lambda: results.append(authorizer.authorize(key.key.access_key, key.private_key, BOT_IP, "read"))
            )
            worker.start()
            time.sleep(0.1)  # the uncached verification is running now
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            worker.join(20)
            assert [r.decision for r in results] == [Decision.ALLOW]
            assert server.wait(20) == 0
            assert time.monotonic() - signalled < 5, "shutdown waited for its grace (10 s)"
            assert "Traceback" not in server.log.read_text()
            with pytest.raises(Unavailable):
                authorizer.authorize(key.key.access_key, key.private_key, BOT_IP, "read")
    finally:
        if server.proc.poll() is None:
            server.kill()


# -- the Python client --------------------------------------------------------------


def test_streaming_authorizer_serves_200_threads_as_authorize_would(
    server: RunningServer, client: Client, account: str
) -> None:
    keys = [client.create_key(account, f"bot{i}", "trade", [BOT_IP]) for i in range(4)]
    whitelisted = WithdrawalDestination("BTC", "bc1qcold")
    cases: list[tuple[str, str, str, str, WithdrawalDestination | None]] = []
    for i in range(200):
        key = keys[i % len(keys)]
        access_key, secret = key.key.access_key, key.private_key
        match i % 5:
            case 0 | 1:
                cases.append((access_key, secret, BOT_IP, "trade", None))
            case 2:
                cases.append((access_key, WRONG, BOT_IP, "read", None))
            case 3:
                cases.append((access_key, secret, BOT_IP, "withdraw", whitelisted))
            case _:
                cases.append((access_key, secret, "not-an-ip", "read", None))

    def outcome(call: Any, case: tuple[Any, ...]) -> AuthorizeResult | tuple[type[KeyguardError], Any]:
        try:
            result: AuthorizeResult = call(*case)
        except InvalidArgument as exc:
            return InvalidArgument, (exc.violations, exc.message)
        return result

    expected = [outcome(client.authorize, case) for case in cases]
    assert {type(e) for e in expected} == {AuthorizeResult, tuple}
    invalid = [e for e in expected if isinstance(e, tuple)]
    assert len(invalid) == 40
    assert all([v.field for v in violations] == ["client_ip"] for _, (violations, _) in invalid)

    with client.authorizer(streams=2) as authorizer:
        go = threading.Barrier(200)

        def call(case: tuple[Any, ...]) -> Any:
            go.wait()  # all 200 at once
            return outcome(authorizer.authorize, case)

        with ThreadPoolExecutor(200) as pool:
            got = list(pool.map(call, cases))
    assert got == expected


def test_streaming_authorizer_raises_the_callers_refusal(server: RunningServer) -> None:
    with Client(server.target, token="kgt_not-a-configured-token-at-all") as client:
        authorizer = client.authorizer()
        with pytest.raises(Unauthenticated):
            authorizer.authorize("kg_" + "x" * 24, "", BOT_IP, "read")


def test_streaming_authorizer_closes_and_is_closed_with_its_client(
    server: RunningServer, client: Client, account: str
) -> None:
    key = client.create_key(account, "bot", "read", [BOT_IP])
    authorizer = client.authorizer(streams=3)
    assert authorizer.authorize(key.key.access_key, key.private_key, BOT_IP, "read").allowed
    authorizer.close()
    authorizer.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        authorizer.authorize(key.key.access_key, key.private_key, BOT_IP, "read")
    other = server.client()
    closed_with_client = other.authorizer()
    assert closed_with_client.authorize(key.key.access_key, key.private_key, BOT_IP, "read").allowed
    other.close()
    with pytest.raises(ValueError, match="closed"):
        closed_with_client.authorize(key.key.access_key, key.private_key, BOT_IP, "read")
    with pytest.raises(ValueError, match="at least 1"):
        client.authorizer(streams=0)


def test_streaming_authorizer_gives_up_after_the_client_timeout(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, account: str
) -> None:
    server = start_server()
    authorizer = server.server.authorizer
    assert authorizer is not None

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(60)

    with Client(server.target, token=server.admin_token, timeout=0.3) as client:
        key = client.create_key(account, "bot", "read", [BOT_IP])
        monkeypatch.setattr(authorizer, "decide", lambda query: stuck())
        with client.authorizer() as streaming, pytest.raises(ServerError) as late:
            streaming.authorize(key.key.access_key, key.private_key, BOT_IP, "read")
    assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("reads", [0, 1, 300], ids=["unread", "first-answer", "mid-stream"])
def test_a_stream_its_caller_cancels_mid_write_is_no_error(
    server: RunningServer, client: Client, account: str, caplog: pytest.LogCaptureFixture, reads: int
) -> None:
    """Cancelling is how callers end streams: the server, busy writing answers, logs nothing above DEBUG."""
    caplog.set_level(logging.DEBUG, logger="keyguard")
    caplog.set_level(logging.DEBUG, logger="grpc")
    key = client.create_key(account, "bot", "read", [BOT_IP])
    messages = [pb.AuthorizeStreamRequest(id=i, request=request(key)) for i in range(5000)]
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    for _ in range(10):  # each a race between the server's writes and the cancellation
        with grpc.insecure_channel(server.target) as channel:
            call = pb_grpc.AuthorizationStub(channel).AuthorizeStream(iter(messages), metadata=metadata, timeout=30)
            answers = iter(call)
            for _ in range(reads):
                next(answers)
            if not reads:
                time.sleep(0.05)  # the server writes until flow control holds it
            call.cancel()
            assert call.code() is grpc.StatusCode.CANCELLED
    time.sleep(0.5)  # the server's side of the last cancellation
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
