"""Shutdown: SIGTERM under load, black-box, on a real `keyguard-server serve` process with real
calls in flight; and what the shutdown cuts short ends quietly.

Every call that arrived before the signal is finished within ``shutdown_grace``, or answered
UNAVAILABLE (retryable: the server is shutting down), never CANCELLED, which a client cannot
safely retry. Health says NOT_SERVING at once, every change acknowledged is stored, and the
process is gone within the grace.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyguard import CreatedKey
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._secrets import Argon2Params, SecretHasher, new_private_key
from keyguard_server._services import ENVOY_AUTHORIZATION, KEYGUARD_SERVICES
from tests.processes import ServeProcess

BOT_IP = "203.0.113.7"
GRACE = 1.5
# argon2 at the server's own defaults (~0.1 s a run): 16 cold keys are more than the grace can
# verify on argon2's share of the machine, so some calls must be answered before they finish.
SLOW_ARGON2_ENV = {
    "KEYGUARD_ARGON2_TIME_COST": "3",
    "KEYGUARD_ARGON2_MEMORY_KIB": "65536",
    "KEYGUARD_ARGON2_PARALLELISM": "1",
}
CACHED, COLD, WRITES = 27, 16, 6  # + 1 AuthorizeStream = 50 calls in flight
HEALTH_NAMES = ("", *KEYGUARD_SERVICES, ENVOY_AUTHORIZATION)


@dataclass
class Outcome:
    """What the calls in flight at the signal were answered, by kind and status code."""

    codes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    details: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # OK answers that decided nothing
    renamed: dict[str, str] = field(default_factory=dict)  # acknowledged renames: access key -> name
    created: list[str] = field(default_factory=list)  # acknowledged creations: access keys

    def count(self, kind: str, code: grpc.StatusCode) -> None:
        self.codes[kind, code.name] += 1

    def of(self, code: str) -> int:
        return sum(n for (_, c), n in self.codes.items() if c == code)


async def _authorize(auth: Any, key: CreatedKey, kind: str, outcome: Outcome, metadata: Any) -> None:
    request = pb.AuthorizeRequest(
        access_key=key.key.access_key,
        private_key=key.private_key,
        client_ip=BOT_IP,
        required_permission=pb.PERMISSION_READ,
    )
    try:
        answer = await auth.Authorize(request, timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        outcome.count(kind, exc.code())
        outcome.details[exc.code().name, exc.details() or ""] += 1
        return
    outcome.count(kind, grpc.StatusCode.OK)
    allowed = {pb.DECISION_ALLOW} if kind == "cached" else {pb.DECISION_ALLOW, pb.DECISION_VERIFICATION_BUSY}
    if answer.decision not in allowed:
        outcome.bad.append(f"{kind}: {pb.Decision.Name(answer.decision)}")


async def _rename(keys: Any, account: str, key: CreatedKey, name: str, outcome: Outcome, metadata: Any) -> None:
    request = pb.UpdateKeyRequest(account_id=account, access_key=key.key.access_key, name=name)
    try:
        await keys.UpdateKey(request, timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        outcome.count("write", exc.code())
        return
    outcome.count("write", grpc.StatusCode.OK)
    outcome.renamed[key.key.access_key] = name


async def _create(keys: Any, account: str, name: str, outcome: Outcome, metadata: Any) -> None:
    request = pb.CreateKeyRequest(account_id=account, name=name, permission=pb.PERMISSION_READ)
    try:
        created = await keys.CreateKey(request, timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        outcome.count("write", exc.code())
        return
    outcome.count("write", grpc.StatusCode.OK)
    outcome.created.append(created.key.access_key)


async def _stream(auth: Any, cached: CreatedKey, cold: list[CreatedKey], outcome: Outcome, metadata: Any) -> None:
    """A long-lived stream (never half-closed, as a gateway's): it ends OK or UNAVAILABLE, every
    answer it got deciding something."""
    call = auth.AuthorizeStream(timeout=30, metadata=metadata)
    try:
        for i, key in enumerate([cached, cached, *cold]):
            request = pb.AuthorizeRequest(
                access_key=key.key.access_key,
                private_key=key.private_key,
                client_ip=BOT_IP,
                required_permission=pb.PERMISSION_READ,
            )
            await call.write(pb.AuthorizeStreamRequest(id=i, request=request))
    except Exception:  # the stream ended before all was sent: its status says how
        pass
    try:
        async for answer in call:
            if answer.WhichOneof("result") != "response" or answer.response.decision == pb.DECISION_UNSPECIFIED:
                outcome.bad.append(f"stream: {answer}")
        code = await call.code()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        # INTERNAL "Internal error from Core" with 'Failed "execute_batch": (<...SendMessageOperation...>,)'
        # is grpc.aio's client reporting its own failed write over the server's status (see _drain).
        outcome.details[code.name, f"stream: {exc.details()} ({exc.debug_error_string()})"] += 1
    outcome.count("stream", code)


async def _health_after_signal(health: Any, sent: float) -> float | str:
    """Seconds from the signal until every health name said NOT_SERVING (polled), or the last
    answers if that took more than a second."""
    while True:
        answers = await asyncio.gather(
            *(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1) for name in HEALTH_NAMES),
            return_exceptions=True,
        )
        if all(
            isinstance(a, health_pb2.HealthCheckResponse) and a.status == health_pb2.HealthCheckResponse.NOT_SERVING
            for a in answers
        ):
            return time.monotonic() - sent
        if time.monotonic() - sent > 1:
            return f"health after SIGTERM: {answers}"
        await asyncio.sleep(0.005)


async def _sigterm_under_load(
    process: ServeProcess, account: str, keys: dict[str, Any]
) -> tuple[Outcome, float | str, float]:
    token = (process.cwd / "data" / "admin.token").read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),)
    outcome = Outcome()
    async with (
        grpc.aio.insecure_channel(process.target) as channel,
        grpc.aio.insecure_channel(process.target) as health_channel,
    ):
        auth = pb_grpc.AuthorizationStub(channel)
        manage = pb_grpc.KeyManagementStub(channel)
        health: Any = health_pb2_grpc.HealthStub(health_channel)  # the typeshed stub lists no methods
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected before the signal
        cached, cold, renamed = keys["cached"], keys["cold"], keys["renamed"]
        calls = [
            *(_authorize(auth, cached[i % len(cached)], "cached", outcome, metadata) for i in range(CACHED)),
            *(_authorize(auth, key, "cold", outcome, metadata) for key in cold),
            *(_rename(manage, account, key, f"renamed-{i}", outcome, metadata) for i, key in enumerate(renamed)),
            *(_create(manage, account, f"new-{i}", outcome, metadata) for i in range(WRITES - len(renamed))),
            _stream(auth, cached[0], cold[:2], outcome, metadata),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.005)  # sent, and arriving
        process.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        health_seconds = await _health_after_signal(health, sent)
        await asyncio.gather(*tasks)
    return outcome, health_seconds, sent


def test_sigterm_under_load_finishes_calls_or_answers_unavailable(tmp_path: Path) -> None:
    process = ServeProcess(tmp_path, env={**SLOW_ARGON2_ENV, "KEYGUARD_SHUTDOWN_GRACE": str(GRACE)})
    account = "acct-writes"
    try:
        with process.client() as client:
            # Accounts of their own: an account holds at most 16 keys.
            cached = [client.create_key("acct-cached", f"cached-{i}", "read", [BOT_IP]) for i in range(3)]
            for key in cached:  # verified once: from now on decided from memory
                assert client.authorize(key.key.access_key, key.private_key, BOT_IP, "read").allowed
            cold = [client.create_key("acct-cold", f"cold-{i}", "read", [BOT_IP]) for i in range(COLD)]
            renamed = [client.create_key(account, f"write-{i}", "read") for i in range(4)]
        keys = {"cached": cached, "cold": cold, "renamed": renamed}
        outcome, health_seconds, sent = asyncio.run(_sigterm_under_load(process, account, keys))
        exit_code = process.wait(GRACE + 10)
        exited_after = time.monotonic() - sent
    finally:
        if process.proc.poll() is None:
            process.kill()
    print(f"details: {dict(outcome.details)}")
    print(f"status codes: {dict(outcome.codes)}; health NOT_SERVING after: {health_seconds}")
    assert sum(outcome.codes.values()) == CACHED + COLD + WRITES + 1
    assert outcome.of("CANCELLED") == 0, dict(outcome.codes)
    assert outcome.of("OK") + outcome.of("UNAVAILABLE") == sum(outcome.codes.values()), (
        dict(outcome.codes),
        dict(outcome.details),
    )
    assert not outcome.bad
    # NOT_SERVING, not a refused connection, from the signal on: measured 14-40 ms here; the bound
    # is loose so that a busy machine does not fail it (the poll gives up after a second).
    assert isinstance(health_seconds, float) and health_seconds < 1, health_seconds
    assert exit_code == 0
    assert exited_after < GRACE + 2
    # Every change acknowledged (OK) is in the database.
    with sqlite3.connect(tmp_path / "data" / "keyguard.db") as db:
        names = dict(db.execute("SELECT access_key, name FROM key_model").fetchall())
    assert {ak: names.get(ak) for ak in outcome.renamed} == outcome.renamed
    assert all(ak in names for ak in outcome.created)
    log = process.log.read_text()
    assert "Traceback" not in log, log


def test_a_hash_cut_short_by_shutdown_ends_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A CreateKey answered UNAVAILABLE at the end of the grace leaves its hash running; the
    hasher's close then ends the hashing process under it. That is the shutdown, not a failure:
    no ERROR, no process started again, no "exception was never retrieved" traceback."""

    async def scenario() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
        hasher = SecretHasher(Argon2Params(time_cost=3, memory_kib=65536, parallelism=1), 1, 8)
        await hasher.calibrate()
        caller = asyncio.create_task(hasher.hash(new_private_key()))
        await asyncio.sleep(0.02)  # the hash is under way
        caller.cancel()
        await hasher.close()
        await asyncio.sleep(0.1)  # the hashing task sees its process gone
        assert hasher._hash_worker is not None and hasher._hash_worker.process.poll() is not None
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)
        return reported

    caplog.set_level(logging.ERROR, logger="keyguard.argon2")
    assert asyncio.run(scenario()) == []
    assert not caplog.records
