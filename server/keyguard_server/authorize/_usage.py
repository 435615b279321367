"""Last-used times: recorded per ALLOW in memory, written in batches (one transaction), with a
backoff while the database refuses them."""

from __future__ import annotations

import logging

from keyguard_server._validation import IPAddress
from keyguard_server.store import Store

log = logging.getLogger("keyguard.service")


class UsageRecorder:
    """Last-used time and IP of keys, written in batches rather than per request."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[str, tuple[int, IPAddress]] = {}

    def record(self, access_key: str, ip: IPAddress, at_us: int) -> None:
        self._pending[access_key] = (at_us, ip)

    async def flush(self) -> int:
        """Writes what was recorded since the last flush, in one transaction (off the loop)."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_last_used({key: (at_us, str(ip)) for key, (at_us, ip) in batch.items()})
        except BaseException:
            # Not lost: merged back (newer uses win) for the next flush to retry.
            for access_key, used in batch.items():
                self._pending.setdefault(access_key, used)
            raise
        return len(batch)


# The longest the periodic last-used flush waits between attempts while they fail.
FLUSH_BACKOFF_CAP = 60.0


class FlushBackoff:
    """When the periodic last-used flush runs next, and what its failures log.

    Every ``every`` seconds while flushes land; after a failure (the database down, or its disk
    full) exponentially less often, doubling up to ``FLUSH_BACKOFF_CAP``, so an outage is not
    hammered with retries nor the log flooded: the first failure of an outage is logged (one
    WARNING), the recovery once (INFO), the attempts in between not. Nothing recorded is lost
    meanwhile: :class:`UsageRecorder` merges a failed batch back, and the next attempt retries it.
    """

    def __init__(self, every: float) -> None:
        self._every = every
        self._cap = max(every, FLUSH_BACKOFF_CAP)
        self._failures = 0  # in a row

    @property
    def delay(self) -> float:
        """Seconds until the next attempt."""
        return min(self._cap, self._every * 2.0**self._failures)

    def failed(self, why: str) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning(
                "could not record last-used times: %s; retrying in %g s, then less often (at most every %g s) "
                "until it lands; nothing recorded is lost",
                why,
                self.delay,
                self._cap,
            )

    def landed(self) -> None:
        if self._failures:
            log.info("last-used times recorded again, after %d failed attempts", self._failures)
            self._failures = 0
