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
import sys
import threading
import time
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


def refresh(cfg: ServerConfig, redis_client=None, force: bool = True, progress: Callable | None = None) -> dict:
    """Delete the dataset caches not computed from the data on disk now, except those that only miss appended
    days; then, if the data differs from the last refresh's (or ``force``), drop Qlib's expression cache and
    invalidate every cached answer; then extend the caches that miss appended days (:mod:`.extension`) and were
    used lately, the most used first, so that the first requests after a daily update find them current. The progress is
    kept in Redis (``keys.REFRESH``, on the status page) and passed to ``progress(done, total)``."""
    import redis

    from ..state import keys, usage
    from ..state.cache import ResultCache
    from . import datacache

    client = redis_client if redis_client is not None else redis.Redis(
        host=cfg.redis_host, port=cfg.redis_port, db=cfg.redis_task_db, password=cfg.redis_password)
    root = Path(cfg.provider_uri).expanduser().resolve()  # as Qlib names its cache locks
    digest = data_digest(str(root))  # before the caches: a change from now on shows at the next refresh
    used = usage.recent(client, cfg.refresh_recent_days)
    counts = datacache.drop_stale(root / cfg.dataset_cache_dir_name, client, frozenset(used))
    to_extend = counts.pop("to_extend")
    previous = client.set(keys.DATA_DIGEST, digest, get=True)
    if force or previous not in (digest, digest.encode()):
        shutil.rmtree(root / cfg.features_cache_dir_name, ignore_errors=True)
        counts["generation"] = ResultCache(client, ttl=1).bump_generation()
    counts.update(extend_caches(cfg, client, to_extend, used, progress) if to_extend else {})
    log.info("data refreshed: %s", counts)
    return counts


def extend_caches(cfg: ServerConfig, client, paths: list, used: dict, progress: Callable | None = None) -> dict:
    """Extend each dataset cache of ``paths`` used lately (``used``: its uses in the last ``refresh_recent_days``
    days, by name), the most used first, each under its lock (one a worker brought up to date meanwhile is left
    as it is; one that cannot be extended after all is deleted, to be computed at its next request), then writes
    each of them again as one segment (:func:`_compact`). The others are left to be extended at their next
    request."""
    from ..state import keys, records
    from ..state.sources import RECORDS, is_current
    from . import compute, datacache, extension

    later = [p for p in paths if not used.get(p.name)]  # not used lately: extended at their next request
    paths = sorted((p for p in paths if used.get(p.name)), key=lambda p: (-used[p.name], -_mtime(records.path_of(p))))
    started = time.time()
    counts = {"extended": 0, "failed": 0, "later": len(later)}
    client.hset(keys.REFRESH, mapping={"state": "extending", "total": len(paths), "extended": 0, "failed": 0,
                                       "later": len(later), "compacted": 0, "started": started, "finished": 0})
    if paths:
        compute.init_qlib(cfg)
    for done, path in enumerate(paths, 1):
        with datacache.cache_lock(client, datacache.lock_name(path)):
            if not is_current(path, form=RECORDS):
                if extension.extend_cache(path):
                    counts["extended"] += 1
                else:
                    datacache.clear(path)
                    counts["failed"] += 1
        client.hset(keys.REFRESH, mapping=counts)
        if progress is not None:
            progress(done, len(paths))
    log.info("extended %d dataset caches in %.1f s (%d computed again at their next request; %d not used lately, "
             "extended at their next request)", counts["extended"], time.time() - started, counts["failed"],
             counts["later"])
    counts["compacted"] = _compact(client, paths)
    client.hset(keys.REFRESH, mapping={"state": "done", "finished": time.time(), "compacted": counts["compacted"]})
    return counts


def _compact(client, paths: list) -> int:
    """Once every cache of ``paths`` is current, write each that is several segments again as one, the most used
    first, each under its lock (:func:`.extension.compact`): a client on the server's host then maps it as a
    view again. How many were."""
    from ..state import keys
    from ..state.sources import RECORDS, is_current
    from . import datacache, extension

    started, compacted = time.time(), 0
    client.hset(keys.REFRESH, "state", "compacting")
    for path in paths:
        with datacache.cache_lock(client, datacache.lock_name(path)):
            try:
                compacted += is_current(path, form=RECORDS) and extension.compact(path)
            except (OSError, ValueError):
                log.exception("writing dataset cache %s as one segment failed; it stays as it is", path.name)
    log.info("wrote %d dataset caches again as one segment in %.1f s", compacted, time.time() - started)
    return compacted


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def refresh_main(cfg_values: dict, force: bool = True, show_progress: bool = False) -> None:
    """Process entry point: refresh (see :func:`refresh`); with ``show_progress``, a progress bar on stderr."""
    from ..log import setup_logging

    cfg = ServerConfig(**cfg_values)
    setup_logging(cfg)
    counts = refresh(cfg, force=force, progress=_bar if show_progress else None)
    if show_progress:
        print(f"\ncaches: {counts}", file=sys.stderr)


def _bar(done: int, total: int) -> None:
    filled = 30 * done // max(1, total)
    print(f"\rextending dataset caches [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="",
          file=sys.stderr, flush=True)


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
