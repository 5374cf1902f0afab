"""Which dataset cache a feature request reads: the window it is computed over and its file name.

A request gets exactly local Qlib's frame. Qlib evaluates each field from the request's first day (less the
field's look-back), so a cache computed over the whole history and cut to the request's dates is that frame
only for fields whose values do not depend on where evaluation starts (:func:`~.expressions.start_matters`).
A request that starts mid-calendar with any other field (``EMA``, a rolling mean or deviation, ``Corr``...)
reads a cache of its own start, computed from that day to the end of the data (it serves any end date, and a
daily update extends it); ``inst_processors`` see the frame of the request's window, so a request with them
reads a cache of that window. Every other request reads the whole history's cache, Qlib's own ``_uri``.

The worker computes a cache under this name and the front streams it under the same name.
"""

from __future__ import annotations

from typing import Optional

from .expressions import start_matters

Window = tuple[Optional[str], Optional[str]]


def cache_window(fields, processors, start_time: Optional[str], end_time: Optional[str]) -> Window:
    """The ``(start, end)`` a feature request's cache is computed over (``None``: the data's first or last day)."""
    if processors:
        return start_time, end_time
    if start_time is not None and any(start_matters(field) for field in fields):
        return start_time, None
    return None, None


def request_window(args: dict) -> Window:
    """:func:`cache_window` of checked feature arguments."""
    return cache_window(args["fields"], args.get("inst_processors"), args["start_time"], args["end_time"])


def dataset_uri(instruments, fields, freq: str, processors: list, start_time, end_time) -> str:
    """The file name of the dataset cache of a (checked) feature request: Qlib's ``_uri`` of the whole history, or
    also keyed by the window of :func:`cache_window` (and the processors, as Qlib's ``_uri`` is)."""
    from qlib.data.cache import DatasetCache, DiskDatasetCache
    from qlib.utils import hash_args

    start, end = cache_window(fields, processors, start_time, end_time)
    if start is None and end is None:
        return DiskDatasetCache._uri(instruments, fields, None, None, freq, 1)
    return hash_args(*DatasetCache.normalize_uri_args(instruments, fields, freq), 1, processors,
                     {"start_time": start, "end_time": end})
