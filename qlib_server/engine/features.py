"""A request's fields for every instrument, computed by blocks of instruments with the engine, and by Qlib
for what the engine leaves to it.

For each field this gives what Qlib's ``LocalExpressionProvider.expression`` gives for each instrument: the
expression loaded over its query range (the field's start minus its look-back, to its end plus its
look-ahead), cast to float32, cut to ``[start, end]``. Where the engine meets something it does not model
(:class:`Unsupported`), that field is computed by Qlib for that block of instruments, the reason logged and
counted in :data:`FALLBACKS`.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from qlib.data import base

from . import extend, windows
from .checkpoint import BlockCheckpoint, Checkpoint
from .evaluate import Evaluator
from .kernels import rows
from .values import Series, Unsupported

log = logging.getLogger(__name__)

#: fields computed by Qlib instead of the engine, by reason (this process, since it started)
FALLBACKS: collections.Counter = collections.Counter()
def fallbacks() -> int:
    """How many (field, block) pairs this process has left to Qlib since it started."""
    return sum(FALLBACKS.values())


#: instruments per block at most; and the values of one block's fields at most about :data:`BLOCK_BYTES`,
#: so that a worker's memory stays bounded whatever the market's size and history
BLOCK = 128
BLOCK_BYTES = 64 << 20
#: threads computing blocks at once: the cores this process may run on (at most 4)
THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_QLIB = threading.Lock()


@dataclass
class Block:
    """The fields of a block of instruments over calendar positions ``[start, end]``.

    ``values[c]`` is field ``c``'s float32 array of shape ``(n, end - start + 1)``; ``present[c]`` says where
    Qlib's series of that field has an index entry (a row exists for it, its value possibly NaN)."""

    instruments: list
    start: int
    end: int
    values: list
    present: list
    checkpoint: Optional[BlockCheckpoint] = None


def blocks(instruments: list, names: list, start: int, end: int, *, expression_of: Callable,
           extent_of: Callable, read: Callable, by_qlib: Callable, size: int = BLOCK,
           threads: int = THREADS, checkpoint: bool = False) -> Iterator[Block]:
    """The fields ``names`` (Qlib field strings) of ``instruments``, by blocks of at most ``size``, computed
    by ``threads`` threads (the kernels and NumPy release the GIL), yielded in order.

    ``expression_of(name)`` is Qlib's expression object; ``extent_of(expression)`` its query range for
    ``[start, end]``; ``read(instrument, field)`` a raw feature file (or None); ``by_qlib(instrument, name)``
    Qlib's own series for one instrument (a pandas Series on calendar positions).

    With ``checkpoint``, each block also carries its :class:`~.checkpoint.BlockCheckpoint` (``end`` must be the
    data's last day): ``Checkpoint(names, start, end, [block.checkpoint ...])`` is what :func:`extend_blocks`
    extends when days are appended."""
    expressions = [expression_of(name) for name in names]
    extents = []
    for name, expression in zip(names, expressions):
        try:
            extents.append(extent_of(expression))
        except Unsupported as reason:
            log.info("field %s computed by Qlib: %s", name, reason)
            extents.append(None)
    uses = [_subexpressions(e) for e in expressions]
    later: list[set] = [set()]  # what the fields after each one read (built from the last field back)
    for used in reversed(uses[1:]):
        later.append(later[-1] | used)
    later.reverse()
    prepared = extend.prepare(names, expressions, extents, start, end) if checkpoint else None

    def block(chunk: list) -> Block:
        cached_read = _memo(read)
        evaluators: dict = {}
        values, present = [], []
        fallback = None
        for c, (name, expression, extent) in enumerate(zip(names, expressions, extents)):
            try:
                if extent is None:
                    raise Unsupported("its query range")
                evaluator = evaluators.get(extent)
                if evaluator is None:
                    evaluator = prepared and extend.recorder(prepared, chunk, extent, cached_read) \
                        or Evaluator(chunk, extent[0], extent[1], cached_read)
                    evaluators[extent] = evaluator
                series = evaluator.series(expression)
                array, where = _cut(series, extent[0], start, end)
            except Unsupported as reason:
                fallback = fallback or f"{name}: {reason}"
                with _QLIB:  # Qlib's caches are not made for threads
                    FALLBACKS[str(reason)] += 1
                    log.info("field %s computed by Qlib for %d instruments: %s", name, len(chunk), reason)
                    array, where = _by_qlib(chunk, name, start, end, by_qlib)
            values.append(array)
            present.append(where)
            for evaluator in evaluators.values():  # keep only what a later field of this block reuses
                for key in [k for k in evaluator.memo if k not in later[c]]:
                    del evaluator.memo[key]
        saved = extend.block_checkpoint(prepared, chunk, evaluators, fallback) if prepared else None
        return Block(chunk, start, end, values, present, saved)

    by_bytes = BLOCK_BYTES // max(1, 4 * len(names) * (end - start + 1))
    count = max(1, -(-len(instruments) // max(1, min(size, by_bytes))))  # blocks at most that large
    count = -(-count // threads) * threads  # as many for every thread: none waits on a short last block
    size = max(1, -(-len(instruments) // count))
    chunks = [instruments[first:first + size] for first in range(0, len(instruments), size)]
    if threads <= 1 or len(chunks) <= 1:
        yield from map(block, chunks)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="qlib-server-engine") as pool:
        ahead = collections.deque(pool.submit(block, chunk) for chunk in chunks[:threads])
        for chunk in chunks[threads:]:
            done = ahead.popleft().result()
            ahead.append(pool.submit(block, chunk))  # at most ``threads`` blocks computed ahead of the reader
            yield done
        while ahead:
            yield ahead.popleft().result()


def _memo(read: Callable) -> Callable:
    """``read`` remembering what it read (one block's files, shared by the block's query ranges)."""
    files: dict = {}

    def cached_read(instrument, field):
        if (instrument, field) not in files:
            files[instrument, field] = read(instrument, field)
        return files[instrument, field]

    return cached_read


class _MemoTail:
    """``read`` and its ``tail`` (where it has one) remembering what they read."""

    def __init__(self, read: Callable):
        self.read = read
        self.files: dict = {}
        if hasattr(read, "tail"):
            self.tail = self._tail

    def __call__(self, instrument, field):
        if (instrument, field) not in self.files:
            self.files[instrument, field] = self.read(instrument, field)
        return self.files[instrument, field]

    def _tail(self, instrument, field, since):
        key = (instrument, field, since)
        if key not in self.files:
            self.files[key] = getattr(self.read, "tail")(instrument, field, since)  # noqa: B009
        return self.files[key]


def of_qlib(instruments: list, names: list, start_time, end_time, freq: str, size: int = BLOCK,
            checkpoint: bool = False) -> Iterator[Block]:
    """:func:`blocks` for the fields ``names`` of ``instruments`` over ``[start_time, end_time]``, as Qlib's
    ``LocalExpressionProvider.expression`` would compute each (Qlib must be initialised)."""
    from qlib.config import C
    from qlib.data.data import Cal, ExpressionD

    _, _, start, end = Cal.locate_index(start_time, end_time, freq=freq, future=False)

    def extent_of(expression):
        left, right = expression.get_extended_window_size()
        if not (np.isfinite(left) and np.isfinite(right)):
            raise Unsupported(f"look-back {left}, look-ahead {right}")
        return max(0, start - int(left)), end + int(right)

    return blocks(instruments, names, start, end, expression_of=ExpressionD.get_expression_instance,
                  extent_of=extent_of, read=feature_reader(C.dpm.get_data_uri(freq), freq),
                  by_qlib=lambda inst, name: ExpressionD.expression(inst, name, start_time, end_time, freq),
                  size=size, checkpoint=checkpoint)


def extend_blocks(saved: Checkpoint, end: int, *, expression_of: Callable, read: Callable,
                  rows: int = 1024) -> Iterator[Block]:
    """The rows of ``saved``'s fields that change when the data, which ended at calendar position ``saved.end``,
    now end at ``end``: per block of ``saved`` (same instruments, in order), a :class:`Block` over
    ``[first, end]`` (``first``: the first row a look-ahead or a new day changes; the rows before it are
    unchanged), with its next checkpoint (``Checkpoint(saved.names, saved.start, end, [block.checkpoint ...])``).

    Bit for bit what :func:`blocks` gives for ``[saved.start, end]`` on those rows. Raises :class:`Unsupported`
    (before the first block) where the request must be computed again in full (see :mod:`.incremental`).
    Consecutive blocks are computed together, up to ``rows`` instruments at once (the few rows an extension
    computes make the work per operator small: fewer, larger blocks)."""
    expressions = [expression_of(name) for name in saved.names]
    plans, first = extend.extend(saved, end, expressions)
    batches: list = [[]]
    for saved_block in saved.blocks:
        if batches[-1] and sum(len(b.instruments) for b in batches[-1]) + len(saved_block.instruments) > rows:
            batches.append([])
        batches[-1].append(saved_block)
    for batch in batches:
        if not batch:
            continue
        values, present, after = extend.extend_block(extend.merge(batch), plans, expressions, _MemoTail(read),
                                                     saved.end, end, first)
        row = 0
        for saved_block in batch:
            these = slice(row, row + len(saved_block.instruments))
            row = these.stop
            yield Block(list(saved_block.instruments), first, end, [v[these] for v in values],
                        [p[these] for p in present], extend.split(after, these))


def of_qlib_extend(saved: Checkpoint, freq: str, contents: Optional[dict] = None) -> Iterator[Block]:
    """:func:`extend_blocks` to the last day of Qlib's calendar (Qlib must be initialised on the new data);
    ``contents``: feature files read already (path relative to the data directory → bytes)."""
    from qlib.config import C
    from qlib.data.data import Cal, ExpressionD

    end = len(Cal.calendar(freq=freq)) - 1
    root = Path(C.dpm.get_data_uri(freq))
    read = FeatureReader(root, freq, {os.path.join(root, name): data for name, data in (contents or {}).items()})
    return extend_blocks(saved, end, expression_of=ExpressionD.get_expression_instance, read=read)


def _subexpressions(expression) -> set:
    """``str`` of the expression and of every expression inside it (the evaluator's memo keys)."""
    found, stack = set(), [expression]
    while stack:
        e = stack.pop()
        if isinstance(e, base.Expression):
            found.add(str(e))
            found.update(windows.shared_keys(e))
            stack.extend(vars(e).values())
    return found


def _cut(series: Series, offset: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Qlib's ``series.astype(np.float32).loc[start:end]``: the values on ``[start, end]`` and where the
    series has an index entry there (``series`` holds calendar positions from ``offset``)."""
    data = series.data
    if data.dtype.kind not in "fiub":
        raise Unsupported(f"a field of {data.dtype} values")
    if data.dtype == np.float16:  # NumPy's ``Log`` of a boolean field; float32 holds it exactly (numba has no
        data = data.astype(np.float32)  # float16)
    first, stop = start - offset, min(end + 1 - offset, data.shape[1])  # the series' columns on [start, end]
    return rows.cut(data, first, stop, series.lo, series.hi, end - start + 1)


def _by_qlib(chunk: list, name: str, start: int, end: int, by_qlib: Callable) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(chunk), end - start + 1), np.nan, dtype=np.float32)
    where = np.zeros(out.shape, dtype=bool)
    for i, instrument in enumerate(chunk):
        s = by_qlib(instrument, name)
        if len(s) == 0:
            continue
        if s.dtype != np.float32:
            raise Unsupported(f"Qlib gave {s.dtype} values for {name}")  # the caller leaves the request to Qlib
        positions = s.index.to_numpy(dtype=np.int64) - start
        out[i, positions] = s.to_numpy()
        where[i, positions] = True
    return out, where


class FeatureReader:
    """``read(instrument, field)`` of a Qlib data directory, as Qlib's file storage finds the file: the raw
    file (float32, its first value the start index), or None where there is none.

    ``read.tail(instrument, field, since)`` reads only the values from calendar position ``since`` on:
    ``(first, count, values)``, the file's start index and number of values, and its values from position
    ``max(first, since)`` (what an extension reads)."""

    def __init__(self, data_root: Path, freq: str, contents: Optional[dict] = None):
        self.features, self.freq = os.path.join(os.fspath(data_root), "features"), freq.lower()
        self.contents = contents or {}  # path → the file's bytes, read already (an extension's change check)

    def path(self, instrument: str, field: str) -> str:
        return os.path.join(self.features, _directory(instrument), f"{field.lower()}.{self.freq}.bin")

    def __call__(self, instrument: str, field: str) -> Optional[np.ndarray]:
        try:
            return np.fromfile(self.path(instrument, field), dtype="<f4")
        except FileNotFoundError:
            return None

    def tail(self, instrument: str, field: str, since: int) -> Optional[tuple]:
        path = self.path(instrument, field)
        if path in self.contents:
            data = self.contents[path]
            if len(data) < 4:
                return 0, -1, np.zeros(0, dtype="<f4")
            first = int(np.frombuffer(data[:4], dtype="<f4")[0])
            offset = 4 * (1 + max(0, since - first))
            return first, len(data) // 4 - 1, np.frombuffer(data[offset:], dtype="<f4")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, 4, 0)
            if len(head) < 4:
                return 0, -1, np.zeros(0, dtype="<f4")
            first = int(np.frombuffer(head, dtype="<f4")[0])
            size = os.fstat(fd).st_size
            offset = 4 * (1 + max(0, since - first))
            return first, size // 4 - 1, np.frombuffer(os.pread(fd, max(0, size - offset), offset), dtype="<f4")
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1 << 16)
def _directory(instrument: str) -> str:
    """The directory of an instrument's feature files (Qlib's ``code_to_fname``, lower case)."""
    from qlib.utils import code_to_fname

    return code_to_fname(instrument).lower()


def feature_reader(data_root: Path, freq: str) -> FeatureReader:
    """``read(instrument, field)`` of a Qlib data directory (a :class:`FeatureReader`)."""
    return FeatureReader(data_root, freq)
