"""Answers already computed, shared by every handler through Redis.

A hot request (the same calendar, instrument list or cached feature set asked again) is answered
from here without a task. Entries live ``result_cache_ttl`` seconds and belong to a data generation:
a data update bumps the generation, and older answers are never served again.

Each handler also keeps the answers it read or wrote in the last ``memo_seconds`` (1 s, the same
bound as its look at the generation) in memory, so that a burst of identical hot requests costs one
Redis round trip instead of one each.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import redis

from ..errors import ConnectionLost
from . import keys
from .usage import Usage

_MISS = object()


class ResultCache:
    """Redis-backed cache of successful answers, keyed by data generation and request key."""

    def __init__(self, client: redis.Redis, ttl: float, generation_check: float = 1.0,
                 dataset_cache_dir: Optional[Path] = None, memo_seconds: float = 1.0, memo_size: int = 4096,
                 usage: Optional[Usage] = None):
        self.redis = client
        self.usage = usage  # counts the dataset caches the answers name
        self.ttl = int(ttl)
        self.memo_seconds = min(memo_seconds, ttl)
        self.memo_size = memo_size
        self._memo: dict[tuple, tuple] = {}  # (generation, key) -> (read at, answer)
        seen = dataset_cache_dir is not None and dataset_cache_dir.parent.is_dir()  # this host has the data
        self.dataset_cache_dir = dataset_cache_dir if seen else None
        self.generation_check = generation_check
        self._generation = (0, -1e9)  # value, when read

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def generation(self) -> int:
        """The current data generation (re-read from Redis at most once a ``generation_check``)."""
        value, read_at = self._generation
        now = time.monotonic()
        if now - read_at > self.generation_check:
            self._generation = (value, now)  # one caller reads; those meanwhile keep the last value
            try:
                value = int(self.redis.get(keys.GENERATION) or 0)
            except redis.RedisError:
                self._generation = (value, read_at)
                return value  # keep the last one seen; the registry reports the outage
            self._generation = (value, now)
        return value

    def get(self, key: str, request_type: str = "") -> Any:
        """The cached answer of ``key``, or :data:`MISS`.

        A dataset cache file name is only served while the file and the record of its sources (written
        last, see :mod:`qlib_server.state.sources`) exist, when this handler sees the data directory: a
        cache deleted by hand or found stale by a processor is never handed out.
        """
        if not self.enabled:
            return _MISS
        generation, now = self.generation(), time.monotonic()
        memo = self._memo.get((generation, key))
        if memo is not None and now - memo[0] < self.memo_seconds:
            result, files = memo[1], memo[3]
        else:
            if memo is not None:  # one caller reads it again; those meanwhile (it yields) keep this answer
                self._memo[(generation, key)] = (now, *memo[1:])
            try:
                raw = self.redis.get(keys.result(generation, key))
            except redis.RedisError:
                return _MISS  # a cache that cannot be read is a miss, never an error
            if raw is None:
                self._memo.pop((generation, key), None)
                return _MISS
            if memo is not None and memo[2] == raw:  # unchanged: the same object (the handler's encoded
                result, files = memo[1], memo[3]     # answer of it is reused too)
            else:
                result, files = json.loads(raw), None
            files = self._remember(generation, key, result, now, raw, files)
        if request_type == "feature" and result and self.dataset_cache_dir is not None:
            files = files or self._files(result)
            if not (os.path.exists(files[0]) and os.path.exists(files[1])):  # deleted, or never completed
                return _MISS
            if self.usage is not None:
                self.usage.note(str(result))
        return result

    def _files(self, result: Any) -> tuple[str, str]:
        """A dataset cache's file and the record of its sources (written last)."""
        path = self.dataset_cache_dir / str(result)  # type: ignore[operator]  # only called with a directory
        return str(path), str(path.with_suffix(".sources"))

    def put(self, key: str, result: Any, generation: Optional[int] = None) -> None:
        if not self.enabled:
            return
        try:
            gen = self.generation() if generation is None else generation
            self.redis.set(keys.result(gen, key), json.dumps(result, separators=(",", ":")), ex=self.ttl)
        except redis.RedisError:
            return
        self._remember(gen, key, result, time.monotonic(), None, None)

    def _remember(self, generation: int, key: str, result: Any, now: float, raw: Any,
                  files: Optional[tuple[str, str]]) -> Optional[tuple[str, str]]:
        """Keep ``result`` (and the ``raw`` bytes it was read from) for ``memo_seconds``; returns the paths
        of its dataset cache files when it names one (a string), so they are built once."""
        if files is None and isinstance(result, str) and result and self.dataset_cache_dir is not None:
            files = self._files(result)
        if self.memo_seconds <= 0:
            return files
        if len(self._memo) >= self.memo_size:
            self._memo = {k: v for k, v in self._memo.items() if now - v[0] < self.memo_seconds}
            if len(self._memo) >= self.memo_size:
                self._memo.clear()
        self._memo[(generation, key)] = (now, result, raw, files)
        return files

    def bump_generation(self) -> int:
        """Invalidate every cached answer (called when the data changes)."""
        try:
            value = int(self.redis.incr(keys.GENERATION))
        except redis.RedisError as exc:
            raise ConnectionLost(f"redis: {exc}") from exc
        self._generation = (value, time.monotonic())
        return value


MISS = _MISS
