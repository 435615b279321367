"""Builds and runs the gRPC server: keyguard's services plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._auth import CallerInterceptor, ensure_admin_token
from keyguard_server._config import Config
from keyguard_server._grpc import AuthorizationServicer, KeyManagementServicer
from keyguard_server._secrets import SecretHasher
from keyguard_server._service import Authorizer, KeyManager
from keyguard_server._store import Store

log = logging.getLogger("keyguard.server")

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())

# The largest valid request (30 allowlist entries) is a few KiB.
MAX_MESSAGE_BYTES = 64 * 1024


class KeyguardServer:
    """Store, argon2 pool and gRPC server, started and stopped as one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port = 0
        self._store: Store | None = None
        self._hasher: SecretHasher | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()

    async def start(self) -> int:
        """Opens the database, binds and starts serving; returns the bound port."""
        config = self.config
        self._store = Store.open(config.database_url)
        self._hasher = SecretHasher(config.argon2, config.argon2_threads)
        callers = config.callers or (ensure_admin_token(config),)
        server = grpc.aio.server(
            interceptors=[CallerInterceptor(callers)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_KeyManagementServicer_to_server(
            KeyManagementServicer(KeyManager(self._store, self._hasher, config)), server
        )
        pb_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(Authorizer(self._store, self._hasher)), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            if config.tls:
                self.port = server.add_secure_port(config.listen, _tls_credentials(config))
            else:
                self.port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
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
        """Stops accepting calls, lets in-flight ones finish within ``grace``, closes the DB."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._hasher is not None:
            self._hasher.close()
        if self._store is not None:
            self._store.close()
        log.info("keyguard stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve(config: Config) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    server = KeyguardServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace %.1fs)", config.shutdown_grace)
    await server.stop(config.shutdown_grace)


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
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
