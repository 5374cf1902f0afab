"""Qlib's dataset cache made safe for many workers and for data that changes.

Locks. Qlib guards each cache with python-redis-lock locks that never expire (and its writers share
one id, so a second writer fails instead of waiting): a worker killed while holding one blocks that
cache for ever. :func:`install_locks` replaces ``CacheUtils.reader_lock`` and ``writer_lock`` with one
exclusive lock per cache that a thread of the holder renews, and that expires
``keys.QLIB_CACHE_LOCK_EXPIRE`` seconds after a dead holder's last renewal. Taking it waits for a
live holder.

Sources. Before a worker computes a cache, it records the stat of every file the cache depends on
(:func:`cache_sources`) and writes that record last (:mod:`qlib_server.state.sources`, which the front
reads too). A cache is served only while its record matches the disk: otherwise it is stale (or was
never completed), and it is deleted and computed again.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import pickle
import re
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import redis_lock
from qlib.config import C
from qlib.data.cache import CacheUtils, DatasetCache, DiskDatasetCache, H
from qlib.utils import code_to_fname, remove_fields_space

from ..dataset_keys import cache_window, dataset_uri
from ..inst_processors import build
from ..state import keys, records
from ..state.sources import HDF5, RECORDS, digests_path, is_current, read_record, sources_path, stat_of, write_sources
from . import changes, dataset, extension, storage

log = logging.getLogger(__name__)

#: seconds of one wait for a held lock (a blocking read on Redis: under any client's socket timeout)
WAIT_SLICE = 1
# In an expression: $field or $$pit_field, Feature('field') or PFeature('pit_field'), or another
# string literal (ChangeInstrument and Mask name an instrument with one).
_REFERENCE = re.compile(r"""\$(\$?)(\w+)|\b(P?)Feature\(\s*["'](\w+)["']|["']([^"'\n]*)["']""")


# -- locks ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cache_lock(redis_client, lock_name: str):
    """Hold the lock of one Qlib cache (``lock_name`` is Qlib's name for it) for the duration of the block."""
    lock = redis_lock.Lock(redis_client, keys.QLIB_CACHE_LOCK + lock_name, expire=keys.QLIB_CACHE_LOCK_EXPIRE,
                           auto_renewal=True)
    while not lock.acquire(timeout=WAIT_SLICE):
        pass  # held by a live worker (it renews the lock) or a dead one (the lock expires soon)
    try:
        yield
    finally:
        try:
            lock.release()
        except redis_lock.NotAcquired:  # its renewal stalled longer than the expiry: another may have taken it
            log.warning("the lock on %s expired while held", lock_name)


def install_locks() -> None:
    """Make every lock this process takes on Qlib's caches (dataset and expression) a :func:`cache_lock`."""
    CacheUtils.reader_lock = CacheUtils.writer_lock = staticmethod(cache_lock)


def lock_name(cache_path: Path) -> str:
    """Qlib's lock name for the dataset cache at ``<data>/<dataset_cache_dir_name>/<uri>``."""
    return f"{cache_path.parent.parent}:dataset-{cache_path.name}"


# -- sources ----------------------------------------------------------------------------------------

def references(expressions: Iterable[str]) -> tuple[set, set, set]:
    """The raw fields, point-in-time fields and string literals (possible instrument codes) named."""
    fields: set[str] = set()
    pit: set[str] = set()
    literals: set[str] = set()
    for expression in expressions:
        for match in _REFERENCE.finditer(expression):
            dollars, name, p, quoted, literal = match.groups()
            if name is not None:
                (pit if dollars else fields).add(name.lower())
            elif quoted is not None:
                (pit if p else fields).add(quoted.lower())
            else:
                literals.add(literal)
    return fields, pit, literals


def cache_sources(root: Path, instruments, fields: Iterable[str], freq: str) -> dict:
    """The stat of every file under the data directory ``root`` a dataset cache of these arguments is
    computed from, by path relative to ``root``: the calendar, the market's instrument file, and each
    raw field named (in the fields or the filter rules) of each instrument the market ever lists."""
    expressions, names = list(fields), [f"calendars/{freq.lower()}.txt"]
    if isinstance(instruments, dict) and "market" in instruments:
        names.append(f"instruments/{instruments['market'].lower()}.txt")
        try:
            codes = {line.split()[0] for line in (root / names[-1]).read_text().splitlines() if line.strip()}
        except FileNotFoundError:
            codes = set()
        expressions += [f.get("rule_expression", "") for f in instruments.get("filter_pipe") or []]
    else:  # codes, or a dict of codes and their spans
        codes = {instruments} if isinstance(instruments, str) else set(instruments)
    raw, pit, literals = references(expressions)
    for code in sorted(codes | literals):
        directory = code_to_fname(code).lower()
        names += [f"features/{directory}/{field}.{freq.lower()}.bin" for field in sorted(raw)]
        names += [f"financial/{directory}/{field}.{ext}" for field in sorted(pit) for ext in ("data", "index")]
    base = str(root)
    return {name: stat_of(os.path.join(base, name)) for name in names}  # str paths: cheaper than pathlib's


def clear(cache_path: Path) -> None:
    """Delete a cache: the record of its sources first, so that what is left never reads as complete."""
    target = sources_path(cache_path)
    kept, digests = records.path_of(cache_path), digests_path(cache_path)
    for path in (target, cache_path, cache_path.with_suffix(".meta"), cache_path.with_suffix(".index"),
                 cache_path.with_suffix(".data"), target.with_name(target.name + ".tmp"), kept,
                 kept.with_name(kept.name + ".tmp"), digests, digests.with_name(digests.name + ".tmp"),
                 cache_path.with_suffix(".checkpoint"), cache_path.with_suffix(".checkpoint.tmp"),
                 *records.segment_files(cache_path)):
        path.unlink(missing_ok=True)


def write_empty(cache_path: Path, instruments, fields: list, freq: str, last_update: str) -> None:
    """Write a cache of no rows in Qlib's layout, which ``read_data_from_cache`` reads as the empty frame
    local Qlib gives (Qlib itself writes no file for an empty result)."""
    columns = sorted(set(remove_fields_space(fields)))
    index = pd.MultiIndex.from_arrays([[], []], names=("datetime", "instrument"))
    meta = {"info": {"instruments": instruments, "fields": columns, "freq": freq, "last_update": last_update,
                     "inst_processors": []}, "meta": {"last_visit": time.time(), "visits": 1}}
    cache_path.with_suffix(".meta").write_bytes(pickle.dumps(meta))
    spans = pd.DataFrame({"start": np.array([], np.int32), "end": np.array([], np.int32)},
                         index=pd.DatetimeIndex([], name="datetime"))
    # Fixed format: pandas writes no table for a frame of no rows.
    with pd.HDFStore(cache_path.with_suffix(".index"), mode="w") as store:
        store.put(DiskDatasetCache.IndexManager.KEY, spans, format="fixed", track_times=False)
    with pd.HDFStore(cache_path.with_suffix(".data"), mode="w") as store:
        store.put(DatasetCache.HDF_KEY, pd.DataFrame(index=index, columns=columns, dtype=np.float32),
                  format="fixed", track_times=False)
    cache_path.with_suffix(".data").rename(cache_path)


def write_table(cache_path: Path, pieces: Iterable[pd.DataFrame], instruments, freq: str, last_update: str,
                inst_processors=()) -> bool:
    """Write a feature set given in the cache's layout (:func:`dataset.cache_layout`), in pieces of consecutive
    days, as Qlib's dataset cache, as ``gen_dataset_cache`` does (pandas' HDF5 table under key ``df``; a
    ``.meta`` pickle; a ``.index`` table of each day's ``[start, end)`` rows), in one pass: the day spans come
    from the sorted index (no group-by) and no PyTables column index is built (readers select rows by
    position). Returns False, writing nothing, when there are no pieces (no rows)."""
    readable = stat.S_IRWXU | stat.S_IRGRP | stat.S_IROTH
    data = cache_path.with_suffix(".data")
    days, counts, columns = [], [], None
    with pd.HDFStore(data, mode="w") as store:
        for piece in pieces:
            if columns is None:
                columns = list(piece.columns)
                # the codes of every piece must fit the string column the first one makes
                width = {"instrument": piece.attrs.get(dataset.CODE_WIDTH) or
                         max(len(str(c)) for c in piece.index.get_level_values("instrument"))}
            store.append(DatasetCache.HDF_KEY, piece, format="table", index=False, min_itemsize=width)
            day, count = np.unique(piece.index.get_level_values("datetime").values, return_counts=True)
            days.append(day)
            counts.append(count)
    if columns is None:
        data.unlink()
        return False
    meta = {"info": {"instruments": instruments, "fields": columns, "freq": freq,
                     "last_update": last_update, "inst_processors": list(inst_processors)},
            "meta": {"last_visit": time.time(), "visits": 1}}
    cache_path.with_suffix(".meta").write_bytes(pickle.dumps(meta, protocol=C.dump_protocol_version))
    cache_path.with_suffix(".meta").chmod(readable)
    count = np.concatenate(counts)
    end = np.cumsum(count).astype(np.int32)
    spans = pd.DataFrame({"start": end - count.astype(np.int32), "end": end},
                         index=pd.DatetimeIndex(np.concatenate(days), name="datetime"))
    with pd.HDFStore(cache_path.with_suffix(".index"), mode="w") as store:
        store.put(DiskDatasetCache.IndexManager.KEY, spans, format="table", index=False, track_times=False)
    cache_path.with_suffix(".index").chmod(readable)
    data.rename(cache_path)
    return True


def drop_stale(directory: Path, redis_client, extending: frozenset = frozenset()) -> dict:
    """Delete every dataset cache in ``directory`` that is not current and cannot be extended (the data changed
    otherwise than by appended days: :func:`extension.extendable`), each under its lock (so none is deleted
    while a worker writes it); return how many were kept and dropped, and the caches to extend. The caches named
    in ``extending`` (about to be extended, which tells the change apart again) are only checked to have what an
    extension needs."""
    counts: dict = {"kept": 0, "dropped": 0, "to_extend": []}
    uris = sorted({p.name.split(".")[0] for p in directory.iterdir()}) if directory.is_dir() else []
    stat = functools.cache(stat_of)  # caches share their sources: stat each file once
    for uri in uris:
        path = directory / uri
        if is_current(path, stat, form=RECORDS):  # written with every cache, whatever other form it has
            counts["kept"] += 1
            continue
        with cache_lock(redis_client, lock_name(path)):
            if is_current(path, form=RECORDS):  # a worker may have just completed it
                counts["kept"] += 1
            elif extension.extendable(path, classify=uri not in extending):
                counts["to_extend"].append(path)
            else:
                clear(path)
                counts["dropped"] += 1
    return counts


#: whether the dataset caches this thread computes now need Qlib's HDF5 form (a stock pyqlib client asked)
_HDF5_WANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("hdf5_wanted", default=True)


@contextlib.contextmanager
def records_only():
    """Within the block, a dataset cache is computed (or found current) in the records form only: the request
    comes from ``qlib_server.client``, which streams it, and no stock client needs Qlib's HDF5 file."""
    token = _HDF5_WANTED.set(False)
    try:
        yield
    finally:
        _HDF5_WANTED.reset(token)


def with_timestamps(instruments):
    """A dict of codes and spans with its dates as Timestamps (what ``D.list_instruments`` gives Qlib);
    any other instruments as they are."""
    if not isinstance(instruments, dict) or "market" in instruments:
        return instruments
    return {code: [(pd.Timestamp(start), pd.Timestamp(end)) for start, end in spans]
            for code, spans in instruments.items()}


def write_records(cache_path: Path, rows: dataset.CacheRows) -> None:
    """Write the records file of a cache (see :mod:`qlib_server.state.records`), or publish it where the engine
    wrote it as it computed."""
    if rows.written is not None:
        records.publish(cache_path, [rows.written])
        return
    segment = records.segment_path(cache_path)
    writer = records.Writer(segment, rows.columns, rows.codes, rows.unit, rows.rows)
    try:
        for part in rows.parts():
            writer.add(*part)
    except BaseException:
        writer.abandon()
        raise
    days = writer.close()
    records.publish(cache_path, [(segment, days)])


def record_frames(table: records.Records) -> Iterator[pd.DataFrame]:
    """A records file as the pieces of consecutive whole days that :func:`write_table` writes (rows by day, then
    instrument; the columns sorted, as Qlib's cache holds them, whatever order the records hold them in)."""
    codes = np.array(table.codes, dtype=object)
    fields = np.argsort(np.array(table.columns, dtype=object), kind="stable")
    width = max([len(c) for c in table.codes] + [1])
    target = max(1, min(dataset.CHUNK_ROWS, dataset.CHUNK_BYTES // (4 * max(1, len(table.columns)))))
    step = max(1, target * len(table.days) // max(1, len(table)))  # days of about ``target`` rows
    for first in range(0, len(table.days), step):
        datetime, instrument, values = table.take(table.days[first], table.days[min(first + step, len(table.days)) - 1])
        order = np.argsort(datetime, kind="stable")  # by day; each day's rows stay by instrument
        datetime, instrument, values = datetime[order], instrument[order], values.T[np.ix_(fields, order)].T
        index = pd.MultiIndex.from_arrays([pd.DatetimeIndex(datetime), codes[instrument]],
                                          names=["datetime", "instrument"])
        piece = pd.DataFrame(values, index=index, columns=[table.columns[k] for k in fields], copy=False)
        piece.attrs[dataset.CODE_WIDTH] = width
        yield piece


def add_hdf5(cache_path: Path, instruments, freq: str) -> None:
    """Add Qlib's HDF5 form to a cache current in its records form only (computed for ``qlib_server.client``,
    or extended since), from its records: the stock client then reads what was computed, nothing computed
    again. The caller holds the cache's lock."""
    from qlib.data.data import Cal

    record = read_record(cache_path)
    assert record is not None, "add_hdf5 of a cache with no record"
    table = records.read(cache_path)
    H.clear()
    last_update = str(Cal.calendar(freq=freq)[-1])
    if not write_table(cache_path, record_frames(table), instruments, freq, last_update):
        write_empty(cache_path, instruments, sorted(table.columns), freq, last_update)
    write_sources(cache_path, record["files"], (RECORDS, HDF5))


def compute_cache(cache_path: Path, provider, instruments, fields, freq: str, inst_processors=(),
                  hdf5: bool = True, window: tuple = (None, None)) -> None:
    """Compute a dataset cache over its ``window`` (:func:`~qlib_server.dataset_keys.cache_window`; ``None``: the
    calendar's first or last day): the sources recorded (stats, then digests) before computing and written last,
    the records always written, with the engine's checkpoint (what extends the cache when days are appended,
    :mod:`.extension`), Qlib's HDF5 files with ``hdf5`` (a stock client needs them), each in one pass, and an empty
    result written as a cache of no rows. The caller holds the cache's lock. ``inst_processors`` (checked, in their
    wire form: :mod:`qlib_server.inst_processors`, built here) see the window's frame; such a cache is never
    extended."""
    from qlib.data.data import Cal

    from .extension import save_checkpoint

    clear(cache_path)
    root = cache_path.parent.parent
    sources = cache_sources(root, instruments, fields, freq)
    digests = changes.digests(root, sources)  # after the stats: a change made meanwhile shows later
    H.clear()  # compute from the files just recorded, not from calendars and features held in memory
    storage.forget()
    calendar = Cal.calendar(freq=freq)
    first, last = window[0] or calendar[0], window[1] or calendar[-1]
    rows = dataset.cache_rows(provider, with_timestamps(instruments), fields, first, last, freq,
                              build(inst_processors), scratch=cache_path.parent,
                              segment=None if hdf5 else records.segment_path(cache_path))
    write_records(cache_path, rows)
    save_checkpoint(cache_path, rows.checkpoint)
    forms: tuple = (RECORDS,)
    if hdf5:
        if not write_table(cache_path, rows.frames(), instruments, freq, str(calendar[-1]), inst_processors):
            write_empty(cache_path, instruments, fields, freq, str(calendar[-1]))
        forms = (RECORDS, HDF5)
    request = None if inst_processors else {"instruments": instruments, "fields": list(fields), "freq": freq,
                                            "start_time": window[0]}
    write_sources(cache_path, sources, forms, digests, request)


class ServerDatasetCache(DiskDatasetCache):
    """Qlib's disk dataset cache, serving a cache only while it is current (see the module docstring)."""

    @staticmethod
    def check_cache_exists(cache_path, suffix_list=(".index", ".meta")) -> bool:
        return is_current(Path(cache_path))

    def dataset(self, instruments, fields, start_time=None, end_time=None, freq="day", disk_cache=1,
                inst_processors=None):
        """Qlib's, but what uses no cache (``disk_cache=0``: an ``ExpressionDFilter``'s rule, among others) is
        computed by the engine (by Qlib where the engine leaves it)."""
        if disk_cache == 0:
            return dataset.dataset(self.provider, instruments, fields, start_time, end_time, freq,
                                   inst_processors or ())
        return super().dataset(instruments, fields, start_time, end_time, freq, disk_cache,
                               inst_processors=[] if inst_processors is None else inst_processors)

    @staticmethod
    def clear_cache(cache_path) -> None:
        clear(Path(cache_path))

    def _dataset_uri(self, instruments, fields, start_time=None, end_time=None, freq="day", disk_cache=0,
                     inst_processors=None):
        """The uri of a dataset cache computed when not current, over the window of
        :func:`~qlib_server.dataset_keys.cache_window` (``inst_processors`` checked, in their wire form)."""
        inst_processors = [] if inst_processors is None else inst_processors  # Qlib's default, not shared
        if disk_cache == 0:  # Qlib prepares the expression cache
            return super()._dataset_uri(instruments, fields, start_time, end_time, freq, disk_cache, inst_processors)
        uri = dataset_uri(instruments, fields, freq, inst_processors, start_time, end_time)
        path = self.get_cache_dir(freq) / uri
        form = HDF5 if _HDF5_WANTED.get() else RECORDS
        window = cache_window(fields, inst_processors, start_time, end_time)
        if not is_current(path, form=form):
            with CacheUtils.writer_lock(self.r, lock_name(path)):
                if is_current(path, form=form):  # another worker computed it meanwhile
                    pass
                elif form == HDF5 and is_current(path, form=RECORDS):  # streamed so far: Qlib's files from it
                    add_hdf5(path, instruments, freq)
                elif not inst_processors and extension.try_extend(path, instruments, fields, freq):  # days appended
                    if form == HDF5:
                        add_hdf5(path, instruments, freq)
                else:
                    self.gen_dataset_cache(path, instruments, fields, freq, inst_processors, window)
        return uri

    def gen_dataset_cache(self, cache_path, instruments, fields, freq, inst_processors=None, window=(None, None)):
        """Qlib's generation, as :func:`compute_cache` does it (over the ``window`` with ``inst_processors``).
        Unlike Qlib's it returns no frame: the server only asks for a cache's uri (``_dataset_uri``)."""
        compute_cache(Path(cache_path), self.provider, instruments, fields, freq, inst_processors or [],
                      hdf5=_HDF5_WANTED.get(), window=window)
