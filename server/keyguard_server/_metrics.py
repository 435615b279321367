"""Prometheus metrics: what an operator graphs and alerts on. Never a secret or an access key.

One process (the default) keeps prometheus_client's in-process values. With
``--workers N`` and ``metrics_listen`` set, the supervisor (:class:`WorkerMetrics`)
sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers, so in each worker
prometheus_client picks its multiprocess values when it is first imported: every
worker writes its values to its own files there, and the supervisor alone serves
one endpoint with their sum. (Multiprocess values cost ~2.7 µs more per Authorize,
a counter and a histogram: one process does not pay it.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

log = logging.getLogger("keyguard.metrics")

DECISIONS = Counter(
    "keyguard_authorize_decisions_total",
    "Authorize answers (gRPC Authorize and Envoy Check), by decision.",
    ["decision"],
)
RPC_SECONDS = Histogram(
    "keyguard_rpc_duration_seconds",
    "Time to answer an RPC, by method (caller checks included).",
    ["method"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ARGON2_VERIFICATIONS = Counter(
    "keyguard_argon2_verifications_total", "Secrets checked with argon2 (cache misses that got that far)."
)
CACHE_HITS = Counter("keyguard_verify_cache_hits_total", "Secrets accepted from the verification cache.")
ARGON2_PENDING = Gauge(
    "keyguard_argon2_pending",
    "argon2 verifications running or waiting for a thread.",
    multiprocess_mode="livesum",  # --workers: the sum over the workers alive
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_values() -> bool:
    """Whether this process's metrics are written to ``PROMETHEUS_MULTIPROC_DIR`` (chosen when
    prometheus_client was first imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def serve(listen: str, registry: CollectorRegistry = REGISTRY) -> Any:
    """Serves ``registry`` (by default this process's) over HTTP at ``listen``, host:port."""
    host, _, port = listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


class WorkerMetrics:
    """``--workers N``: the supervisor's one metrics endpoint, the sum over every worker.

    The workers' files live in a fresh directory ``<data_dir>/metrics-*`` (0700), locked
    while this supervisor lives and removed when it stops; directories a killed supervisor
    left behind are removed at the next start (their lock is free). A worker that exits is
    marked dead: its counters stay in the sum, its gauges leave it.
    """

    def __init__(self, data_dir: str, listen: str) -> None:
        root = Path(data_dir)
        # One supervisor at a time sweeps and creates, so none removes another's new directory.
        with (root / "metrics.lock").open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            for stale in root.glob("metrics-*"):
                if stale.is_dir() and _unlocked(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            self.path = Path(tempfile.mkdtemp(prefix="metrics-", dir=root))
            self._lock: IO[str] = (self.path / ".lock").open("w")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.path))  # type: ignore[no-untyped-call]
        try:
            self._server = serve(listen, registry)
        except OSError:  # the address is taken: leave nothing behind
            shutil.rmtree(self.path, ignore_errors=True)
            self._lock.close()
            raise
        os.environ[MULTIPROCESS_ENV] = str(self.path)  # before any worker starts (and imports prometheus_client)
        self.port: int = self._server.server_port

    def worker_exited(self, pid: int) -> None:
        multiprocess.mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def _unlocked(directory: Path) -> bool:
    """No living supervisor holds ``directory``'s lock (or it never got to take it)."""
    try:
        with (directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except FileNotFoundError:
        return True
    except OSError:  # locked (BlockingIOError), or not ours to judge
        return False
