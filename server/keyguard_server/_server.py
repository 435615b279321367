"""Builds and runs the gRPC server: keyguard's services plus health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2
from playhouse import db_url

from keyguard import KeyguardError
from keyguard_server._callers import Callers, ensure_admin_token
from keyguard_server._config import Config
from keyguard_server._drain import Drain
from keyguard_server._envoy import EnvoyAuthorizationServicer
from keyguard_server._grpc import AuthorizationServicer, KeyManagementServicer
from keyguard_server._keys import KeyManager
from keyguard_server._metrics import MULTIPROCESS_ENV, WorkerMetrics, multiprocess_values
from keyguard_server._metrics import serve as serve_metrics
from keyguard_server._routing import routes
from keyguard_server._secrets import SecretHasher
from keyguard_server._services import ENVOY_AUTHORIZATION, KEYGUARD_SERVICES, WRITES_HEALTH
from keyguard_server.authorize._authorizer import Authorizer
from keyguard_server.authorize._usage import FlushBackoff
from keyguard_server.store import Store

log = logging.getLogger("keyguard.server")


# The largest valid request (30 allowlist entries) is a few KiB.
MAX_MESSAGE_BYTES = 64 * 1024

# What one process holds for its peers is bounded, whoever they are: every
# connection, and every stream until its request is read, is unauthenticated.
# (No cap on all concurrent RPCs, grpc.aio.server(maximum_concurrent_rpcs):
# these bounds already hold, and anyone could fill it to shut callers out.)
GRPC_LIMITS = {
    # More connections are closed as soon as they are accepted. Below the
    # process's open-file limit (ulimit -n), which the database shares.
    "grpc.max_allowed_incoming_connections": 1000,
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS. grpcio's own client does not
    # queue every stream beyond it (measured: 250 concurrent calls on one
    # channel against 100 got 25 UNAVAILABLE), so the bound sits well above
    # what a gateway multiplexes on one connection.
    "grpc.max_concurrent_streams": 1000,
    # A connection without calls for 5 minutes is closed (GOAWAY), freeing its slot.
    "grpc.max_connection_idle_ms": 5 * 60 * 1000,
    # During calls, pings find peers that vanished without closing.
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
    # Clients may ping every 10 s, and not at all without calls (gRPC's default:
    # idle connections close anyway); a client pinging more is cut off after 2 strikes.
    "grpc.http2.min_ping_interval_without_data_ms": 10_000,
    "grpc.http2.max_ping_strikes": 2,
}
# Health.Watch is open to anyone and each watch is held as long as the watcher
# likes: more are refused (RESOURCE_EXHAUSTED); Check answers as ever.
MAX_HEALTH_WATCHES = 64


class KeyguardServer:
    """Store, argon2 pool and gRPC server, started and stopped as one."""

    def __init__(self, config: Config, *, tracer_provider: Any = None) -> None:
        """``tracer_provider``: an OpenTelemetry SDK TracerProvider to trace into (tests, embedding),
        whatever ``config.tracing`` says; otherwise ``tracing = "otlp"`` makes one that exports over OTLP."""
        self.config = config
        self._tracer_provider = tracer_provider
        self._tracing: Any = None
        self.port = 0
        self._store: Store | None = None
        self._hasher: SecretHasher | None = None
        self._server: grpc.aio.Server | None = None
        self._health = BoundedHealthServicer()
        self._drain = Drain()
        self._background: list[asyncio.Task[None]] = []
        self._flush_backoff = FlushBackoff(config.last_used_flush_seconds)
        self._metrics_server: Any = None
        self.metrics_port = 0
        self.authorizer: Authorizer | None = None
        self.manager: KeyManager | None = None
        self._authorization: AuthorizationServicer | None = None
        self._stopped = False

    async def start(self) -> int:
        """Opens the database, binds and starts serving; returns the bound port."""
        config = self.config
        _make_private_storage(config)
        # A bad token file stops the start before the database is opened.
        callers = config.callers or (ensure_admin_token(config),)
        self._store = await Store.open(config.database_settings)
        self._hasher = SecretHasher(
            config.argon2,
            config.argon2_threads,
            config.argon2_max_pending,
            config.argon2_max_pending_hashes,
            cpu_share=config.argon2_cpu_share / config.workers,  # of the machine, for all workers
            suspect_cpu_share=config.argon2_suspect_cpu_share / config.workers,
            max_wait=config.argon2_max_wait_seconds,
        )
        await self._hasher.calibrate()
        self.authorizer = Authorizer(self._store, self._hasher, config)
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        if config.tracing or self._tracer_provider is not None:
            from keyguard_server._tracing import Tracing  # off: nothing of OpenTelemetry is imported

            self._tracing = Tracing(self._tracer_provider)
            interceptors = self._tracing.interceptors  # a span covers the caller check too
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Only workers share a port; otherwise a second server fails loudly.
                ("grpc.so_reuseport", int(config.workers > 1)),
                *GRPC_LIMITS.items(),
            ],
        )
        self.manager = KeyManager(self._store, self._hasher, config)
        self._authorization = AuthorizationServicer(self.authorizer, config.authorize_stream_max_in_flight)
        keys, envoy = KeyManagementServicer(self.manager), EnvoyAuthorizationServicer(self.authorizer, config)
        table = routes(Callers(callers), self._drain, keys, self._authorization, envoy, self._health)
        server.add_generic_rpc_handlers((table,))
        try:
            if config.tls:
                self.port = server.add_secure_port(config.listen, _tls_credentials(config))
            else:
                self.port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        self._server = server
        if config.metrics_listen:
            self._metrics_server = serve_metrics(config.metrics_listen)
            self.metrics_port = self._metrics_server.server_port
        await self._set_health(await self._store.ping(config.health_check_timeout_seconds))
        self._background = [
            asyncio.create_task(self._flush_usage_periodically()),
            asyncio.create_task(self._watch_database()),
        ]
        log.info(
            "keyguard serving on %s (port %d, %s), database %s, callers: %s",
            config.listen,
            self.port,
            ("mTLS" if config.tls_client_ca_file else "TLS") if config.tls else "plaintext",
            _redact(config.database_url),
            ", ".join(f"{c.name} ({c.role})" for c in callers),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health says NOT_SERVING (every name, at once), calls from now on are refused
        (UNAVAILABLE), those in flight finish within ``grace`` seconds (None: 0) or answer
        UNAVAILABLE (see _drain); then grpc stops, and only then the argon2 processes and the
        database, which the calls needed. Stopping a stopped server does nothing."""
        if self._stopped:
            return
        self._stopped = True
        deadline = asyncio.get_running_loop().time() + (grace or 0.0)
        await self._health.enter_graceful_shutdown()
        if self._authorization is not None:
            self._authorization.end_streams()  # they answer what they read, then end within the grace
        if self._server is not None:
            await self._drain.drain(grace or 0.0)
            # Nothing is left in a handler: grpc's shutdown (GOAWAY) has no call to cancel.
            await self._server.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.authorizer is not None:
            await self.flush_usage()
        if self._hasher is not None:
            await self._hasher.close()
        if self._store is not None:
            await self._store.close()
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.close)  # exports what is buffered: not on the loop
        log.info("keyguard stopped")

    async def flush_usage(self) -> None:
        """Writes the last-used times recorded since the last flush; forgets stale nonces."""
        assert self.authorizer is not None
        try:
            await self.authorizer.usage.flush()
            await self.authorizer.forget_old_nonces()
        except KeyguardError as exc:  # the database is away or full: retried, backing off
            self._flush_backoff.failed(exc.message)
        except Exception:  # a failed flush must not stop the server; the next one retries
            log.exception("could not record last-used times")
        else:
            self._flush_backoff.landed()

    async def _set_health(self, serving: bool, writes_land: bool = True) -> None:
        """Every name ``serving``; ``keyguard.writes`` only while writes land too (see _services)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *KEYGUARD_SERVICES, ENVOY_AUTHORIZATION):
            await self._health.set(name, status)
        writes = serving and writes_land
        await self._health.set(
            WRITES_HEALTH,
            health_pb2.HealthCheckResponse.SERVING if writes else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def _watch_database(self) -> None:
        """SERVING only while the database answers in time (a silent partition counts, not only a
        refusal), so load balancers route around a broken one; SERVING again when it is back.
        ``keyguard.writes`` also turns NOT_SERVING while writes meet a full disk (the database
        answering all the same), and SERVING again once a write, or the watcher's probe, lands."""
        assert self._store is not None
        serving = writes = True
        timeout = self.config.health_check_timeout_seconds
        while not self._stopped:  # not only cancellation: 3.11's wait_for can swallow one
            await asyncio.sleep(self.config.health_check_seconds)
            now = await self._store.ping(timeout)
            landing = await self._store.writes_land(timeout) if now else writes
            if now != serving:
                log.warning("database %s", "reachable again" if now else "unreachable: health is NOT_SERVING")
            elif landing != writes:
                log.warning(
                    "writes %s", "land again" if landing else "fail, the disk is full: keyguard.writes is NOT_SERVING"
                )
            if (now, landing) != (serving, writes):
                await self._set_health(now, landing)
                serving, writes = now, landing

    async def _flush_usage_periodically(self) -> None:
        while not self._stopped:  # not only cancellation: 3.11's wait_for can swallow one
            await asyncio.sleep(self._flush_backoff.delay)
            await self.flush_usage()


class BoundedHealthServicer(health.aio.HealthServicer):
    """Health checking with at most MAX_HEALTH_WATCHES watches at a time (10,000 watches
    from nobody in particular grew the server by 43 MiB)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches = 0

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> None:
        if self._watches >= MAX_HEALTH_WATCHES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_HEALTH_WATCHES} health watches at a time; use Check"
            )
        self._watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches -= 1

    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """UNIMPLEMENTED, said plainly. grpc_health's asyncio servicer leaves List to the generated
        base class, whose NotImplementedError answered UNKNOWN and logged an ERROR traceback for
        each call, from anyone (health is open to all)."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Health/List is not served; use Check or Watch")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
    # At DEBUG, peewee logs every statement with its parameters: argon2 hashes, allowlists, the whitelist.
    logging.getLogger("peewee").setLevel(logging.INFO)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs ``main`` on uvloop, an event loop in C (libuv). grpc.aio's every call goes through
    several loop passes, callbacks and futures; on asyncio's Python loop that machinery was
    ~1/3 of a no-op call's instructions (callgrind: a no-op 473k -> 313k, Authorize 551k -> 395k)."""
    uvloop.run(main)


def run(config: Config) -> None:
    """`keyguard-server serve`: one process, or ``config.workers`` processes on one port."""
    configure_logging(config)
    if config.workers == 1:
        run_loop(serve(config))
        return
    host, _, port = config.listen.rpartition(":")
    if port == "0":  # the workers must agree on a port: pick one now
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host.strip("[]"), 0))
            config = dataclasses.replace(config, listen=f"{host}:{probe.getsockname()[1]}")
    # One metrics endpoint, here: the workers only write their values (see _metrics.WorkerMetrics).
    metrics = None
    if config.metrics_listen:
        Path(config.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        metrics = WorkerMetrics(config.data_dir, config.metrics_listen)
    try:
        _supervise(dataclasses.replace(config, metrics_listen=""), metrics)
    finally:
        if metrics is not None:
            metrics.close()


def _supervise(config: Config, metrics: WorkerMetrics | None) -> None:
    # The schema (and SQLite's WAL mode) is settled once, before any worker opens the database:
    # workers starting together on a fresh database otherwise race, and SQLite answers a
    # connection switching to WAL while another migrates "database is locked" without waiting.
    run_loop(_open_and_close(config))
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(config, metrics is not None), name=f"worker-{i + 1}")
        for i in range(config.workers)
    ]
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sentinels = {w.sentinel: w for w in workers}
    while sentinels:
        for ready in multiprocessing.connection.wait(list(sentinels)):
            worker = sentinels.pop(ready)  # type: ignore[arg-type]  # wait() returns what it was given
            worker.join()  # the sentinel can fire before the exit code is collectable
            if metrics is not None and worker.pid is not None:
                metrics.worker_exited(worker.pid)
            if worker.exitcode != 0 and sentinels:
                log.error("%s exited with %s; stopping the others", worker.name, worker.exitcode)
                stop(signal.SIGTERM, None)
    if any(w.exitcode != 0 for w in workers):
        raise SystemExit(1)


async def _open_and_close(config: Config) -> None:
    store = await Store.open(config.database_settings)
    await store.close()


def _worker(config: Config, shared_metrics: bool) -> None:
    configure_logging(config)
    if shared_metrics and not multiprocess_values():
        # prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: this
        # worker's values would be invisible to the supervisor's endpoint.
        raise RuntimeError(f"{MULTIPROCESS_ENV} was not set when prometheus_client was imported")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM
    run_loop(serve(config))


async def serve(config: Config) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    server = KeyguardServer(config)
    await server.start()
    # What start() built lives as long as the process: out of the collector's way, so that
    # the collections the calls' garbage sets off do not walk it again and again.
    gc.collect()
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace %.1fs)", config.shutdown_grace)
    await server.stop(config.shutdown_grace)


def _make_private_storage(config: Config) -> None:
    """The data dir (mode 0700) and a SQLite database's files (0600) are keyguard's alone.

    They hold argon2 hashes, IP allowlists, the withdrawal whitelist and the
    audit log. The database file is created 0600 before SQLite opens it, as
    SQLite gives its -wal and -shm files the mode of the database file; files
    an earlier version left readable are tightened. (Setting the umask would
    do it too, but the umask is global to the process and all its threads.)
    """
    Path(config.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    if not config.database_settings.is_sqlite:
        return
    path = db_url.parse(config.database_url)["database"]
    if path in ("", ":memory:"):
        return
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(name, 0o600)


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key_file), read(config.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _redact(url: str) -> str:
    """The database URL for the log, without its password: not in the user info, nor in a query
    parameter (?password=, ?sslpassword=, ...). Every query value is hidden, as a secret can hide
    behind any spelling of its key (percent-escapes, ";" separators)."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    if ":" in userinfo:
        url = url.replace(parts.netloc, f"{userinfo.split(':', 1)[0]}:***@{host}", 1)
    if parts.query:
        url = url.replace(f"?{parts.query}", "?" + re.sub(r"=[^&]*", "=***", parts.query), 1)
    return url
