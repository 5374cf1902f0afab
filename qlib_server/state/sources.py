"""The record of a dataset cache's sources: whether a cache on the shared disk is current.

Qlib keys a dataset cache by the request, not by the data it was computed from. Before a worker computes
one (:mod:`qlib_server.worker.datacache`), it records the stat (size and mtime, or missing) of every file
the cache depends on; it writes that record last, atomically, as ``<uri>.sources`` beside Qlib's
``<uri>``, ``<uri>.index`` and ``<uri>.meta``. A cache is current only while its record matches the disk:
workers serve and the front streams (:mod:`qlib_server.front.transfer`) only a current cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from qlib.data.cache import DiskDatasetCache

SOURCES = ".sources"


def stat_of(path: Path) -> Optional[list]:
    """``[size, mtime_ns]`` of a file, or None when it is missing."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns]


def sources_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(SOURCES)


def write_sources(cache_path: Path, sources: dict) -> None:
    """Write the record of a cache's sources atomically (a temporary file renamed into place)."""
    target = sources_path(cache_path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps({"files": sources}, separators=(",", ":")))
    os.replace(temporary, target)


def is_current(cache_path: Path, stat: Callable[[Path], Optional[list]] = stat_of) -> bool:
    """Whether the cache is complete (Qlib's three files and the record of its sources) and computed
    from the data on disk now (every recorded stat still holds)."""
    try:
        files = json.loads(sources_path(cache_path).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    root = cache_path.parent.parent
    return DiskDatasetCache.check_cache_exists(cache_path) and all(stat(root / n) == v for n, v in files.items())
