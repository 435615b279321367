"""Prometheus metrics: what an operator graphs and alerts on. Never a secret or an access key."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ARGON2_PENDING = Gauge("keyguard_argon2_pending", "argon2 verifications running or waiting for a thread.")
