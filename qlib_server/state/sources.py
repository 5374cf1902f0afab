"""The record of a dataset cache's sources: whether a cache on the shared disk is current.

Qlib keys a dataset cache by the request, not by the data it was computed from. Before a worker computes
one (:mod:`qlib_server.worker.datacache`), it records the stat (size and mtime, or missing) of every file
the cache depends on; it writes that record last, atomically, as ``<uri>.sources`` beside the cache's files.
The record also names the forms written: ``records`` (the file ``qlib_server.client`` streams, see
:mod:`qlib_server.state.records`), always; ``hdf5`` (Qlib's ``<uri>``, ``<uri>.index`` and ``<uri>.meta``,
which the stock pyqlib client reads from a mount) when a stock client asked. A form of a cache is current
only while its record matches the disk: workers serve and the front streams
(:mod:`qlib_server.front.transfer`) only a current cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

from qlib.data.cache import DiskDatasetCache

from . import records

SOURCES = ".sources"
DIGESTS = ".digests"


def stat_of(path: Union[str, Path]) -> Optional[list]:
    """``[size, mtime_ns]`` of a file, or None when it is missing."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns]


def sources_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(SOURCES)


#: the forms of a dataset cache: the records file (always written) and Qlib's HDF5 files
RECORDS, HDF5 = "records", "hdf5"


def digests_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(DIGESTS)


def write_sources(cache_path: Path, sources: dict, forms: tuple = (RECORDS, HDF5),
                  digests: Optional[dict] = None, request: Optional[dict] = None) -> None:
    """Write the record of a cache's sources and of the ``forms`` written, atomically (a temporary file renamed
    into place); before it, the ``digests`` of the sources when taken (what tells a later append of days from
    a rewrite) and the ``request`` computed (what a refresh extends): a file of their own, which requests never
    read."""
    if digests is not None:
        _replace(digests_path(cache_path), {"digests": digests, **({"request": request} if request else {})})
    _replace(sources_path(cache_path), {"files": sources, "forms": list(forms)})


def _replace(target: Path, content: dict) -> None:
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(content, separators=(",", ":")))
    os.replace(temporary, target)


def read_record(cache_path: Path) -> Optional[dict]:
    """The record of a cache's sources (``files``, ``forms``), None when there is none."""
    try:
        record = json.loads(sources_path(cache_path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def read_digests(cache_path: Path, what: str = "digests") -> Optional[dict]:
    """The digests of a cache's sources taken when it was computed (or, ``what="request"``, the request it was
    computed for: ``instruments``, ``fields``, ``freq``), None when there are none."""
    try:
        found = json.loads(digests_path(cache_path).read_text())[what]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, dict) else None


def is_current(cache_path: Path, stat: Callable[[Path], Optional[list]] = stat_of, form: str = HDF5) -> bool:
    """Whether the cache's ``form`` is complete (its files and the record of its sources, which names it) and
    computed from the data on disk now (every recorded stat still holds)."""
    record = read_record(cache_path)
    if record is None:
        return False
    files, forms = record["files"], record.get("forms", [HDF5])
    if form not in forms:
        return False
    complete = (DiskDatasetCache.check_cache_exists(cache_path) if form == HDF5
                else records.of_this_layout(cache_path))
    root = cache_path.parent.parent
    return complete and all(stat(root / n) == v for n, v in files.items())
