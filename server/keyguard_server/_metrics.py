"""Prometheus metrics: what an operator graphs and alerts on. Never a secret or an access key.

One process (the default) keeps prometheus_client's in-process values. With
``--workers N`` and ``metrics_listen`` set, the supervisor (:class:`WorkerMetrics`)
sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers, so in each worker
prometheus_client picks its multiprocess values when it is first imported: every
worker writes its values to its own files there, and the supervisor alone serves
one endpoint with their sum. (Multiprocess values cost ~2.7 µs more per Authorize,
a counter and a histogram: one process does not pay it.)

Every call bumps a decision counter and a latency histogram. In one process those are
:class:`HotCounter` and :class:`HotHistogram`: plain numbers in list slots, read by a collector
at scrape time, instead of prometheus_client's checks and lock on every call (~160 of the ~600
bytecodes a cached Authorize ran). Same names, labels and buckets; the scrape reads them as
they are, never a second late. With multiprocess values they are prometheus_client's own.
"""

from __future__ import annotations

import bisect
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

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
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

log = logging.getLogger("keyguard.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_values() -> bool:
    """Whether this process's metrics are written to ``PROMETHEUS_MULTIPROC_DIR`` (chosen when
    prometheus_client was first imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1  # on the event loop only; a scrape reads it whole (the GIL)


class _Latencies:
    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1  # le: the first bound >= seconds
        self.sum += seconds


class HotCounter:
    """A Counter for calls on the hot path, with at most one label: ``labels(v).inc()`` and
    ``inc()`` as prometheus_client's, bumping a plain number (collected by a :class:`HotCollector`)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, collector: HotCollector | None = None
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.created = time.time()
        self._children: dict[str, _Count] = {}
        self._count = _Count()
        (collector or HOT).metrics.append(self)

    def labels(self, value: str) -> _Count:
        return self._children.setdefault(value, _Count())

    def inc(self) -> None:
        self._count.value += 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if not self.labelnames:
            family.add_metric([], self._count.value, created=self.created)
        for value, count in list(self._children.items()):
            family.add_metric([value], count.value, created=self.created)
        return family


class HotHistogram:
    """A Histogram for calls on the hot path, with one label: ``labels(v).observe(s)`` as
    prometheus_client's, a bisect and two additions (collected by a :class:`HotCollector`)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        *,
        collector: HotCollector | None = None,
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[str, _Latencies] = {}
        (collector or HOT).metrics.append(self)

    def labels(self, value: str) -> _Latencies:
        return self._children.setdefault(value, _Latencies(self.bounds))

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for value, child in list(self._children.items()):
            counts, total = list(child.buckets), child.sum  # as of one moment, then made cumulative
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            family.add_metric([value], cumulative, total)
        return family


class HotCollector:
    """Collects hot metrics at scrape time (:data:`HOT`: registered with the default registry)."""

    def __init__(self) -> None:
        self.metrics: list[HotCounter | HotHistogram] = []

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


HOT = HotCollector()

DECISIONS: Any
RPC_SECONDS: Any
CACHE_HITS: Any
_DECISIONS_ARGS = (
    "keyguard_authorize_decisions_total",
    "Authorize answers (gRPC Authorize and Envoy Check), by decision.",
    ["decision"],
)
_RPC_SECONDS_ARGS = (
    "keyguard_rpc_duration_seconds",
    "Time to answer an RPC, by method (caller checks included).",
    ["method"],
)
_RPC_SECONDS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_CACHE_HITS_ARGS = ("keyguard_verify_cache_hits_total", "Secrets accepted from the verification cache.")
if multiprocess_values():
    DECISIONS = Counter(*_DECISIONS_ARGS)
    RPC_SECONDS = Histogram(*_RPC_SECONDS_ARGS, buckets=_RPC_SECONDS_BUCKETS)
    CACHE_HITS = Counter(*_CACHE_HITS_ARGS)
else:
    DECISIONS = HotCounter(*_DECISIONS_ARGS)
    RPC_SECONDS = HotHistogram(*_RPC_SECONDS_ARGS, buckets=_RPC_SECONDS_BUCKETS)
    CACHE_HITS = HotCounter(*_CACHE_HITS_ARGS)
    REGISTRY.register(HOT)
ARGON2_VERIFICATIONS = Counter(
    "keyguard_argon2_verifications_total", "Secrets checked with argon2 (cache misses that got that far)."
)
ARGON2_CPU_SECONDS = Counter(
    "keyguard_argon2_cpu_seconds_total",
    "CPU time argon2 verifications used (bounded by argon2_cpu_share of the machine's cores).",
)
ARGON2_PENDING = Gauge(
    "keyguard_argon2_pending",
    "argon2 verifications running or waiting for a verifier process.",
    multiprocess_mode="livesum",  # --workers: the sum over the workers alive
)
DATABASE_WRITABLE = Gauge(
    "keyguard_database_writable",
    "1 while writes land; 0 from a write that met a full disk until one lands again.",
    multiprocess_mode="livemin",  # --workers: 0 if any worker alive cannot write
)
DATABASE_FAILURES = Counter(
    "keyguard_database_failures_total",
    "Database calls that failed for the database's sake, not the request's, by reason.",
    ["reason"],  # unreachable, connection_lost, disk_full
)


METRICS_LISTEN_FORM = (
    "HOST:PORT, such as 127.0.0.1:9464 (HOST an IPv4 address, a host name, or an IPv6 address in brackets: "
    "[::1]:9464; PORT 0 to 65535)"
)
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def metrics_address(listen: str) -> tuple[str, int]:
    """``metrics_listen`` as (host, port), or ValueError naming the setting, its value and the form
    it takes: the one reading of the setting, for the config's validation (a mistake stops the
    start with a clear message, not the resolver's "Name or service not known") and for binding."""
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = _is_ip(host, version=6)
    else:
        valid_host = _is_ip(host, version=4) or _HOST_NAME.fullmatch(host) is not None
    if not (colon and valid_host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"config metrics_listen {listen!r} must be {METRICS_LISTEN_FORM}")
    return host, int(port)


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def serve(listen: str, registry: CollectorRegistry = REGISTRY) -> Any:
    """Serves ``registry`` (by default this process's) over HTTP at ``listen`` (see :func:`metrics_address`).

    The endpoint has no authentication: bound beyond loopback (judged by the address bound, so
    a host name counts for what it resolved to), a warning says who can read what."""
    host, port = metrics_address(listen)
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = ipaddress.ip_address(cast(str, server.server_address[0]))  # an IP socket's: a str
    where = f"http://{listen.rpartition(':')[0]}:{server.server_port}/metrics"
    if bound.is_loopback:
        log.info("metrics on %s", where)
    else:
        log.warning(
            "metrics_listen %s: Prometheus metrics (Authorize decision counts, RPC latencies by method, argon2 "
            "load) are served without authentication on %s, to anyone who can reach %s; set metrics_listen to a "
            "loopback address (127.0.0.1:9464) unless a firewall keeps it private",
            listen,
            where,
            "every interface of this host" if bound.is_unspecified else f"{bound}",
        )
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
