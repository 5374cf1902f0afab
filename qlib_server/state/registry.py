"""Who is waiting for what: the session ids waiting for each request key, kept in Redis.

Every add and take runs under a python-redis-lock lock of that key, so a listener adding a waiter and
a responder answering the key never interleave. The first waiter of a key is told so, and only it
publishes a task; the waiters are removed only after they have been answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import redis
import redis_lock

from ..errors import ConnectionLost
from . import keys


def _texts(values) -> list[str]:
    """Redis list items as text (this client does not decode its replies)."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]

class SessionRegistry:
    """Waiting session ids per request key, in Redis, each operation under the key's lock."""

    def __init__(self, client: redis.Redis, ttl: float, probe: Optional[redis.Redis] = None):
        self.redis = client
        self.ttl = int(ttl) + keys.WAITERS_GRACE
        self.probe = probe if probe is not None else client  # answers ping quickly, never retries

    @classmethod
    def from_config(cls, cfg) -> SessionRegistry:
        # A burst of requests waits for a free connection instead of failing ("Too many connections").
        pool = redis.BlockingConnectionPool(
            host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db, password=cfg.redis_password,
            max_connections=cfg.redis_max_connections, timeout=20,
            socket_timeout=15, socket_connect_timeout=5, health_check_interval=30, retry_on_timeout=True,
        )
        probe = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db,
                            password=cfg.redis_password, socket_timeout=1, socket_connect_timeout=1)
        return cls(redis.Redis(connection_pool=pool), cfg.request_timeout, probe)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock = redis_lock.Lock(self.redis, keys.waiters_lock(key), expire=keys.LOCK_EXPIRE)
        try:
            lock.acquire()
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc
        try:
            yield
        finally:
            try:
                lock.release()
            except redis_lock.NotAcquired:
                pass  # it expired while we held it: the work is done, nothing else to undo
            except redis.RedisError:
                pass  # the lock expires by itself

    def add(self, key: str, *sids: str) -> bool:
        """Record that each of ``sids`` waits for ``key``; return True when they are its first waiters."""
        try:
            with self._locked(key):
                pipe = self.redis.pipeline()
                pipe.rpush(keys.waiters(key), *sids)
                pipe.expire(keys.waiters(key), self.ttl)
                length, _ = pipe.execute()
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc
        return length == len(sids)

    @contextmanager
    def answering(self, key: str) -> Iterator[list[str]]:
        """Yield the waiters of ``key``; remove them only when the block finishes without error."""
        try:
            with self._locked(key):
                sids = _texts(self.redis.lrange(keys.waiters(key), 0, -1))
                yield sids
                if sids:
                    self.redis.ltrim(keys.waiters(key), len(sids), -1)
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc

    def discard(self, key: str, sid: str, count: int = 1) -> bool:
        """Remove ``count`` entries of one waiter (timed out or gone); return False when it was no
        longer waiting."""
        try:
            with self._locked(key):
                return bool(self.redis.lrem(keys.waiters(key), count, sid))
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc

    def still_waiting(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """For each (key, sid): whether ``sid`` is still in the waiting list of ``key`` (one round trip)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, sid in pairs:
                pipe.lpos(keys.waiters(key), sid)
            return [position is not None for position in pipe.execute()]
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc

    def waiting(self, key: str) -> list[str]:
        """The waiters of ``key``, for tests and diagnostics."""
        return _texts(self.redis.lrange(keys.waiters(key), 0, -1))

    def ping(self) -> bool:
        try:
            return bool(self.probe.ping())
        except redis.RedisError:
            return False
