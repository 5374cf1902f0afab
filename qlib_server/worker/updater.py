"""Data updates: when the data directory changes, caches follow and no stale answer is served.

Every dataset cache records the data files it was computed from, and a worker serves one only while
they are unchanged (see :mod:`qlib_server.worker.datacache`). On top of that, a refresh deletes the caches
that are no longer current and, when the data directory differs from the one the caches were last
checked against (its digest is kept in Redis), drops Qlib's expression cache and bumps the data
generation: the handlers never serve an answer computed from older data again, and workers drop
their in-memory calendars when they see a task of the new generation. A data processor refreshes
when it starts; its watcher looks at the calendar, instrument and feature files every
``data_check_interval`` seconds and refreshes when they change, and with ``auto_update`` also daily
at ``update_time``. ``qlib-server refresh`` runs one on demand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from ..config import ServerConfig

log = logging.getLogger(__name__)

#: the directories of a Qlib dataset that hold data (the caches live beside them)
DATA_DIRS = ("calendars", "instruments", "features", "financial")


def data_stamp(provider_uri: str) -> tuple:
    """What changes when any data file changes: the path, size and mtime of every file in the data directories."""
    root = Path(provider_uri).expanduser()
    stamp = []
    for directory in DATA_DIRS:
        for parent, _, names in os.walk(root / directory):
            for name in names:
                path = os.path.join(parent, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # removed while we looked: the next look sees it gone
                    continue
                stamp.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return tuple(sorted(stamp))


def data_digest(provider_uri: str) -> str:
    return hashlib.sha256(repr(data_stamp(provider_uri)).encode()).hexdigest()


def refresh(cfg: ServerConfig, redis_client=None, force: bool = True) -> dict:
    """Delete the dataset caches not computed from the data on disk now; then, if the data differs from
    the last refresh's (or ``force``), drop Qlib's expression cache and invalidate every cached answer."""
    import redis

    from ..state import keys
    from ..state.cache import ResultCache
    from . import datacache

    client = redis_client if redis_client is not None else redis.Redis(
        host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db, password=cfg.redis_password)
    root = Path(cfg.provider_uri).expanduser().resolve()  # as Qlib names its cache locks
    digest = data_digest(str(root))  # before the caches: a change from now on shows at the next refresh
    counts = datacache.drop_stale(root / cfg.dataset_cache_dir_name, client)
    previous = client.set(keys.DATA_DIGEST, digest, get=True)
    if force or previous not in (digest, digest.encode()):
        shutil.rmtree(root / cfg.features_cache_dir_name, ignore_errors=True)
        counts["generation"] = ResultCache(client, ttl=1).bump_generation()
    log.info("data refreshed: %s", counts)
    return counts


def refresh_main(cfg_values: dict, force: bool = True) -> None:
    """Process entry point: refresh (see :func:`refresh`)."""
    from ..log import setup_logging

    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    refresh(cfg, force=force)


class DataWatcher(threading.Thread):
    """Calls ``on_change`` when the data files change, and daily at ``update_time`` with ``auto_update``."""

    def __init__(self, cfg: ServerConfig, on_change: Callable[[], None], stop: threading.Event):
        super().__init__(name="data-watcher", daemon=True)
        self.cfg = cfg
        self.on_change = on_change
        self.stop = stop
        self.stamp = data_stamp(cfg.provider_uri)
        self.last_daily = dt.date.today()

    def due_daily(self, now: dt.datetime) -> bool:
        hour, minute = map(int, self.cfg.update_time.split(":"))
        return self.cfg.auto_update and now.date() > self.last_daily and (now.hour, now.minute) >= (hour, minute)

    def run(self) -> None:
        while not self.stop.wait(self.cfg.data_check_interval):
            try:
                stamp, now = data_stamp(self.cfg.provider_uri), dt.datetime.now()
                if stamp != self.stamp or self.due_daily(now):
                    log.info("data changed (or daily update due); refreshing caches")
                    self.on_change()
                    self.stamp, self.last_daily = stamp, now.date()
            except Exception:
                log.exception("data refresh failed; will try again")
