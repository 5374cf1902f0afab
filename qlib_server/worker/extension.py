"""Dataset caches extended by appended days, not computed again.

When the data a cache was computed from changed, :func:`try_extend` asks :mod:`.changes` what happened. An
append of trading days (the calendar and the feature files only grew at the end, spans that ended on the old
last day extended) leaves every row of the cache right except those the new days change: the new days, and
the last old days of a field that looks ahead (a label such as ``Ref($close, -2)``). The engine computes just
those rows from the checkpoint it saved with the cache (:mod:`qlib_server.engine.incremental`: running window
states, bit for bit what a full computation gives), and they become a new segment of the cache's records that
replaces its rows from the first changed day on (:mod:`qlib_server.state.records`): nothing already written is
copied or changed, and readers see the old cache or the new one. A refresh, once every cache it extends is
current, writes each again as one segment in the background (:func:`compact`), which a client on the server's
host maps as a view. Anything else (a value rewritten, a factor changed, an instrument listed or delisted, a
field added, a market with filters, a field the engine leaves to Qlib) is computed again in full by the caller.

Crash safety: the new segment, then the new checkpoint, then the records' manifest, then the record of the
sources are written, each atomically; a cache whose record is older than its checkpoint (a worker killed
between) is computed again, never served: its record does not match the data, and its checkpoint does not
match its record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..state import records
from ..state.sources import RECORDS, read_digests, read_record, write_sources
from . import changes, dataset, storage

log = logging.getLogger(__name__)

CHECKPOINT = ".checkpoint"
#: a cache extended this many times is written again as one segment (its rows copied once)
MAX_SEGMENTS = 16
#: a cache written again as one segment is copied in parts of about this many values (64 MB), so that copying a
#: large market's cache holds little of it
PART_VALUES = 1 << 24


def checkpoint_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(CHECKPOINT)


def save_checkpoint(cache_path: Path, checkpoint) -> None:
    """Keep the engine's checkpoint of a cache (atomically), or remove a stale one when there is none."""
    target = checkpoint_path(cache_path)
    if checkpoint is None:
        target.unlink(missing_ok=True)
        return
    temporary = target.with_name(target.name + ".tmp")
    with open(temporary, "wb") as f:
        checkpoint.save(f)
    os.replace(temporary, target)


def extendable(cache_path: Path, classify: bool = True) -> bool:
    """Whether a cache that is not current may be extended: it has what an extension needs (its request, its
    checkpoint) and (with ``classify``) the data only had days appended since it was computed."""
    record, digests = read_record(cache_path), read_digests(cache_path)
    if record is None or digests is None or read_digests(cache_path, "request") is None \
            or not checkpoint_path(cache_path).exists():
        return False
    return not classify or changes.classify(record["files"], digests, cache_path.parent.parent).kind == changes.APPEND


def extend_cache(cache_path: Path) -> bool:
    """:func:`try_extend` for the request the cache was computed for (a refresh's extension)."""
    request = read_digests(cache_path, "request")
    return request is not None and try_extend(cache_path, request["instruments"], request["fields"],
                                              request["freq"])


def compact(cache_path: Path) -> bool:
    """Write a cache of several segments again as one (its rows copied once, in parts), so that a client on the
    server's host maps it whole as a view of one file (:mod:`qlib_server.client.placed`), as before an update;
    False when it is one segment already. Nothing but the manifest changes: readers see the segments or the one
    file. The caller holds the cache's lock."""
    table = records.read(cache_path)
    if len(table.segments) < 2:
        return False
    records.publish(cache_path, [_write(cache_path, table, len(table), _parts(table))])
    return True


def try_extend(cache_path: Path, instruments, fields, freq: str) -> bool:
    """Bring a cache that is not current up to the data by extending it, when the data only had days appended;
    False (nothing changed) when it must be computed again. The caller holds the cache's lock."""
    record, digests = read_record(cache_path), read_digests(cache_path)
    if record is None or digests is None or RECORDS not in record.get("forms", []) \
            or not records.of_this_layout(cache_path):
        return False
    from .datacache import cache_sources

    root = cache_path.parent.parent
    sources = cache_sources(root, instruments, fields, freq)  # stats first: a change after them shows later
    contents: dict = {}  # the feature files read to tell the change: the extension computes from these bytes
    change = changes.classify(record["files"], digests, root, contents, stats=sources)
    if change.kind != changes.APPEND:
        log.info("dataset cache %s computed again: %s", cache_path.name, change.reason or change.kind)
        return False
    try:
        done = _extend(cache_path, instruments, fields, freq, change, sources, contents)
    except Exception:
        log.exception("extending dataset cache %s failed; computing it again", cache_path.name)
        return False
    if done:
        log.info("dataset cache %s extended: %s", cache_path.name, change.reason)
    return done


def _extend(cache_path: Path, instruments, fields, freq: str, change: changes.Change, sources: dict,
            contents: dict) -> bool:
    from qlib.data.cache import H
    from qlib.data.data import Cal, DatasetD

    from ..engine import features
    from ..engine.checkpoint import Checkpoint
    from ..engine.values import Unsupported

    if isinstance(instruments, dict) and instruments.get("filter_pipe"):
        return False  # a filter may list other instruments on the new days
    if set(sources) != set(change.digests):
        return False  # the sources are other files now
    digests = change.digests  # read after the stats of ``sources`` were taken
    request = {**(read_digests(cache_path, "request") or {}), "instruments": instruments, "fields": list(fields),
               "freq": freq}  # and the start of the cache's window, kept
    if not change.new_days:  # only stats changed (same bytes, or values past the calendar): a fresh record
        write_sources(cache_path, sources, (RECORDS,), digests, request)
        return True
    try:
        saved = Checkpoint.load(checkpoint_path(cache_path))
    except (OSError, ValueError, KeyError):
        return False
    if saved.end + 1 != change.old_length:
        return False  # the checkpoint is not of the data the record describes (a worker killed mid-extension)
    table = records.read(cache_path)
    H.clear()
    storage.forget()
    times = pd.DatetimeIndex(Cal.calendar(freq=freq)).to_numpy()
    spans_of = DatasetD._provider.get_instruments_d(instruments, freq)
    spans_of = spans_of if isinstance(spans_of, dict) else dict.fromkeys(spans_of)
    codes = [code for block in saved.blocks for code in block.instruments]
    if codes != sorted(spans_of) or codes != table.codes or len(times) != change.new_length \
            or list(saved.names) != list(table.columns):  # the new rows' columns are the checkpoint's
        return False
    try:
        blocks = list(features.of_qlib_extend(saved, freq, contents))
    except Unsupported as reason:
        log.info("dataset cache %s not extended: %s", cache_path.name, reason)
        return False
    first = blocks[0].start if blocks else len(times)
    tail = _tail(blocks, codes, spans_of, times, first, len(times) - 1, saved.names)
    keep = int(np.searchsorted(table.days, times[first])) if first < len(times) else len(table.days)
    segments = _segments(cache_path, table, keep, tail)  # the days before the first changed one kept
    save_checkpoint(cache_path, Checkpoint(saved.names, saved.start, len(times) - 1, [b.checkpoint for b in blocks]))
    for stale in (cache_path, cache_path.with_suffix(".index"), cache_path.with_suffix(".meta")):
        stale.unlink(missing_ok=True)  # Qlib's HDF5 form is made again from the records when a stock client asks
    records.publish(cache_path, segments)
    write_sources(cache_path, sources, (RECORDS,), digests, request)
    return True


def _tail(blocks: list, codes: list, spans_of: dict, times: np.ndarray, first: int, end: int,
          names: list) -> dataset.Computed:
    """The changed rows, calendar positions ``[first, end]``, as a :class:`~.dataset.Computed`."""
    width = end - first + 1
    rows = np.zeros((len(codes), width), dtype=bool)
    dense = np.empty((len(names), len(codes), width), dtype=np.float32)
    days = times[first:end + 1]
    at = 0
    for block in blocks:
        n = len(block.instruments)
        mine = rows[at:at + n]
        np.logical_or.reduce(block.present, out=mine)
        mine &= dataset.listed(days, [spans_of[code] for code in block.instruments])
        for k, values in enumerate(block.values):
            dense[k, at:at + n] = values
        at += n
    return dataset.Computed(codes, list(names), times, first, rows, dense)


def _segments(cache_path: Path, table: records.Records, keep: int, tail: dataset.Computed) -> list[tuple[Path, int]]:
    """Write the changed rows as a new segment after the first ``keep`` days of the cache; the segments that
    make the extended cache (all of it in one new segment when it has many already)."""
    kept: list[tuple[Path, int]] = []
    for name, segment in zip(table.files, table.segments):
        if keep <= 0:
            break
        kept.append((cache_path.parent / name, min(len(segment.days), keep)))
        keep -= len(segment.days)
    new = _write(cache_path, table, int(tail.rows.sum()), tail.instrument_parts())
    if len(kept) + 1 <= MAX_SEGMENTS:
        return [*kept, new]
    merged = records.of_segments([*kept, new])  # compact: the kept rows copied once, with the new ones
    return [_write(cache_path, table, len(merged), _parts(merged))]  # (the new segment alone is then unlisted)


def _parts(table: records.Records):
    """All the rows of ``table``, by instrument then day, in parts as :meth:`records.Writer.add` takes them, each
    of about :data:`PART_VALUES` values at most (or one instrument's rows of a segment), whatever the size."""
    listed = table.select().pieces
    most = max(1, PART_VALUES // max(1, len(table.columns)))
    first = 0
    while first < len(listed):
        last, rows = first + 1, listed[first][2] - listed[first][1]
        while last < len(listed) and rows + listed[last][2] - listed[last][1] <= most:
            rows += listed[last][2] - listed[last][1]
            last += 1
        datetime, instrument, values = records.take(listed[first:last], table.unit, len(table.columns))
        yield datetime, instrument, values.T
        first = last


def _write(cache_path: Path, table: records.Records, rows: int, parts) -> tuple[Path, int]:
    """A new segment of ``rows`` rows from ``parts`` (days, instruments, values[col, row]): its file and days."""
    segment = records.segment_path(cache_path)
    writer = records.Writer(segment, table.columns, table.codes, table.unit, rows)
    try:
        for datetimes, which, values in parts:
            writer.add(datetimes, which, values)
    except BaseException:
        writer.abandon()
        raise
    return segment, writer.close()
