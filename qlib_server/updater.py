"""Data updates: when the data directory changes, caches follow and no stale answer is served.

A watcher in the data processor looks at the calendar and instrument files every
``data_check_interval`` seconds; with ``auto_update`` it also refreshes daily at ``update_time``. A
refresh appends the new days to every dataset cache (Qlib's own update), then bumps the data
generation in Redis: cached answers of older generations are never served again, and workers drop
their in-memory calendars when they see a task of the new generation. ``qlib-server refresh`` runs
one on demand.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Callable

from .config import ServerConfig

log = logging.getLogger(__name__)


def data_stamp(provider_uri: str) -> tuple:
    """What changes when the data directory gains days or instruments: names, sizes, mtimes."""
    root = Path(provider_uri).expanduser()
    files = sorted([*root.glob("calendars/*.txt"), *root.glob("instruments/*.txt")])
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def refresh(cfg: ServerConfig, redis_client=None) -> dict:
    """Update Qlib's caches to the data on disk, then invalidate every cached answer."""
    from . import compute
    from .cache import ResultCache
    from .registry import SessionRegistry

    counts = compute.refresh_caches(cfg)
    client = redis_client if redis_client is not None else SessionRegistry.from_config(cfg).redis
    counts["generation"] = ResultCache(client, ttl=1).bump_generation()
    log.info("data refreshed: %s", counts)
    return counts


def refresh_main(cfg_values: dict) -> None:
    """Process entry point: initialise Qlib in server mode and refresh."""
    from . import compute
    from .log import setup_logging

    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    compute.init_qlib(cfg)
    refresh(cfg)


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
