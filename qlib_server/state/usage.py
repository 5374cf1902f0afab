"""Which dataset caches clients use: what a refresh extends first after a data update.

A handler counts, in memory, each answer that names a dataset cache (a feature answer from the result cache,
a feature transfer) and adds its counts to Redis about once a second (:meth:`Usage.flush`): one sorted set
per day (``keys.usage(day)``, kept :data:`KEEP_DAYS` days), cache name → uses. :func:`recent` sums the last
days' sets for the refresh (:mod:`qlib_server.worker.updater`).
"""

from __future__ import annotations

import collections
import datetime as dt
import threading

from . import keys

#: days a day's counts are kept (``refresh_recent_days`` may not look further back)
KEEP_DAYS = 31


def _day(offset: int = 0) -> str:
    return (dt.date.today() - dt.timedelta(days=offset)).isoformat()


class Usage:
    """Uses of dataset caches counted by one process, added to Redis by :meth:`flush`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def note(self, uri: str, uses: int = 1) -> None:
        with self.lock:
            self.counts[uri] += uses

    def flush(self, client) -> None:
        """Add the counts to today's set (they are kept for a later flush when Redis fails)."""
        with self.lock:
            counts, self.counts = self.counts, collections.Counter()
        if not counts:
            return
        key = keys.usage(_day())
        try:
            pipe = client.pipeline(transaction=False)
            for uri, uses in counts.items():
                pipe.zincrby(key, uses, uri)
            pipe.expire(key, KEEP_DAYS * 86400)
            pipe.execute()
        except Exception:
            with self.lock:
                self.counts.update(counts)
            raise


def recent(client, days: int) -> dict[str, float]:
    """Uses of each dataset cache over the last ``days`` days (today included), by cache name."""
    total: collections.Counter = collections.Counter()
    for offset in range(min(days, KEEP_DAYS)):
        for uri, uses in client.zrange(keys.usage(_day(offset)), 0, -1, withscores=True):
            total[uri.decode() if isinstance(uri, bytes) else uri] += uses
    return dict(total)
