"""What changed in the data a dataset cache was computed from: nothing, an append, or a rewrite of the past.

A daily update appends a trading day: to the calendar, to the feature file of every instrument still
trading, and to the spans (in the instrument files) that ended on the old last day. A cache computed before
it is still right for every old day, so it can be *extended* by the new days. Anything else (a value
rewritten in the past, an adjustment factor changed, an instrument listed or delisted, a file added or
removed) means it must be *recomputed*.

The stats of a cache's sources (:func:`qlib_server.worker.datacache.cache_sources`) say whether anything
changed; to tell an append from a rewrite, the record also holds a digest of each file (:func:`digests`),
taken when the stats are and before the cache is computed. :func:`classify` then reads only the files whose
stat changed, and of a file that grew only its recorded size (its old bytes must be intact): O(bytes read).

Decisions. A file whose stat changed but whose bytes did not (touched, copied, rewritten with the same
content) changes no row: if that is all, the answer is an append of no days, which tells the caller to
write a fresh record and nothing else (``current`` means the record holds as it is). Values appended past
the end of the calendar are not read by Qlib, so they change no row either (an update may write features
before the calendar). Point-in-time files (``financial/``) are updated in place, so any change to their
bytes is a rewrite. A span extended past the calendar's last day, or to a date that is not a new calendar
day, is a rewrite. The old calendar's last day is the one spans must have ended on to be extended.

Caveat for the caller: an append leaves old rows right only for expressions that look backwards; one that
reads later days (``Ref($close, -2)`` in a label) changes on the last old days too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from qlib.utils import code_to_fname

from ..state.sources import stat_of

Kind = Literal["current", "append", "rewrite"]
CURRENT: Kind = "current"
APPEND: Kind = "append"
REWRITE: Kind = "rewrite"
#: a span line: ``code start`` (with their separators), the end date, what follows (the line end)
_SPAN = re.compile(r"(\S+\s+\S+\s+)(\S+)(.*)", re.DOTALL)


@dataclass(frozen=True)
class Change:
    """How the data changed since a cache's record: ``kind`` is ``current`` (every recorded stat holds),
    ``append`` (extend the cache: the calendar grew from ``old_length`` to ``new_length`` days, the new
    ones being ``new_days``; none when only stats changed) or ``rewrite`` (recompute it). ``reason`` says
    what changed (for a rewrite: the file and what happened to it). The lengths are set for an append."""

    kind: Kind
    reason: str = ""
    old_length: int = 0
    new_length: int = 0
    new_days: tuple[str, ...] = ()
    digests: dict = field(default_factory=dict)  # for an append: the digest of every file now (for the new record)


class _Rewrite(Exception):
    """A change that makes the cache wrong for old days (the message says which)."""


def _digest(data: bytes) -> str:
    # SHA-256 (hardware-accelerated on x86 and ARM: faster than BLAKE2b there), 128 bits kept
    return hashlib.sha256(data).hexdigest()[:32]


def _read(path: Union[str, Path], size: int = -1) -> Optional[bytes]:
    """The first ``size`` bytes of a file (all for -1), or None when it is missing."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _digests(root: Path, names: Iterable[str]) -> dict[str, Optional[str]]:
    return digests(root, names)


def digests(root: Path, names: Iterable[str]) -> dict[str, Optional[str]]:
    """The digest of each named file under ``root`` (None when it is missing), for a cache's record. Take
    them right after the stats and before computing, so that a change made meanwhile is seen later."""
    base, out = os.fspath(root), {}
    for name in names:
        data = _read(os.path.join(base, name))
        out[name] = None if data is None else _digest(data)
    return out


def _days(text: bytes) -> list[str]:
    return [line.strip() for line in text.decode().splitlines() if line.strip()]


def _date(entries: list[str]) -> Optional[str]:
    """The date of the last calendar entry (an intraday one is ``date time``), None for no entries."""
    return entries[-1].split()[0] if entries else None


def classify(files: dict, digests: dict, root: Path, contents: Optional[dict] = None,
             stats: Optional[dict] = None) -> Change:
    """How the data under ``root`` changed since a cache recorded ``files`` (``{name: [size, mtime_ns] or
    None}``, :func:`~qlib_server.worker.datacache.cache_sources`) and ``digests`` (:func:`digests`). With
    ``contents`` (a dict), the bytes of each feature file read whole are kept there (an extension computes from
    the very bytes told apart). ``stats``: the stats of (some of) the files, taken just before."""
    root = Path(root)
    base = str(root)  # (str paths: a few microseconds a file less than pathlib's)
    stats = stats or {}
    now = {name: stats[name] if name in stats else stat_of(os.path.join(base, name)) for name in files}
    if all(now[name] == stat for name, stat in files.items()):
        return Change(CURRENT)
    seen: dict = {}  # digests of the files read whole, as they are now
    try:
        change = _append(files, digests, root, now, seen, contents)
    except _Rewrite as rewrite:
        return Change(REWRITE, str(rewrite))
    unchanged = {name: digests.get(name) for name in files if now[name] == files[name]}
    missing = [name for name in files if name not in seen and name not in unchanged]
    return replace(change, digests={**unchanged, **seen, **_digests(root, missing)})


def _append(files: dict, recorded: dict, root: Path, now: dict, seen: dict, contents: Optional[dict]) -> Change:
    """The append the changes since the record amount to; raises :class:`_Rewrite` when they are not one."""
    calendar = next((name for name in files if name.startswith("calendars/")), None)
    old_days: list[str] = []
    days: list[str] = []
    if calendar is not None:
        old, new = files[calendar], now[calendar]
        if old == new:
            old_days = days = _days(_read(os.path.join(root, calendar), old[0]) or b"") if old else []
        else:
            data = _intact(calendar, old, new, recorded, root, seen)
            old_days, days = _days(data[: old[0]]), _days(data)
            _check_calendar(calendar, old_days, days)
    grown, touched, instruments = 0, 0, []
    for name, old in files.items():
        new = now[name]
        if name == calendar or old == new:
            continue
        if name.startswith("instruments/"):  # spans are extended in place: checked once the new days are known
            _present(name, old, new, recorded, shrinks=True)  # its spans say what changed (below)
            instruments.append(name)
            continue
        data = _intact(name, old, new, recorded, root, seen)
        if contents is not None:
            contents[name] = data
        if new[0] > old[0]:
            _check_grown(name, data[: old[0]], new[0], calendar, old_days)
            grown += 1
        else:
            touched += 1
    extended = sum(_check_spans(name, files, recorded[name], root, old_days, days, seen) for name in instruments)
    new_days = days[len(old_days):]
    if new_days:
        reason = (f"{len(new_days)} day(s) appended ({new_days[0]} .. {new_days[-1]}): {grown} files grown, "
                  f"{extended} spans extended")
    else:
        reason = f"no day appended: {grown} files grown past the calendar, {touched} touched (same bytes)"
    return Change(APPEND, reason, len(old_days), len(days), tuple(new_days))


def _present(name: str, old: Optional[list], new: Optional[list], recorded: dict, shrinks: bool = False) -> list:
    """The recorded stat of a file whose stat changed from ``old`` to ``new``, when it was there, is there, did
    not shrink (unless it ``shrinks`` in an append) and has a recorded digest."""
    if old is None or new is None:
        raise _Rewrite(f"{name}: {'appeared' if old is None else 'vanished'}")
    if new[0] < old[0] and not shrinks:
        raise _Rewrite(f"{name}: shrank from {old[0]} to {new[0]} bytes")
    if recorded.get(name) is None:
        raise _Rewrite(f"{name}: changed, and no digest of it was recorded")
    return old


def _intact(name: str, old: Optional[list], new: Optional[list], recorded: dict, root: Path, seen: dict) -> bytes:
    """The bytes of a file whose stat changed from ``old`` to ``new``, when it still begins with its recorded
    bytes (its digest as it is now kept in ``seen``: one read for both)."""
    size = _present(name, old, new, recorded)[0]
    data = _read(os.path.join(root, name))
    if data is None:
        raise _Rewrite(f"{name}: vanished")
    state = hashlib.sha256(memoryview(data)[:size])
    if state.hexdigest()[:32] != recorded[name]:
        what = "a day" if name.startswith("calendars/") else "value" if name.startswith("features/") else "data"
        raise _Rewrite(f"{name}: {what} rewritten in its first {size} bytes")
    state.update(memoryview(data)[size:])  # the digest of all of it: the recorded part is not hashed again
    seen[name] = state.hexdigest()[:32]
    return data


def _check_calendar(name: str, old_days: list[str], days: list[str]) -> None:
    """The calendar kept its old days (the last one whole) and appended later ones, in order."""
    if days[: len(old_days)] != old_days:
        raise _Rewrite(f"{name}: its last day {old_days[-1]} rewritten as {days[len(old_days) - 1]}")
    tail = old_days[-1:] + days[len(old_days):]
    for before, day in zip(tail, tail[1:]):
        if day <= before:
            raise _Rewrite(f"{name}: day {day} appended after {before}")


def _check_grown(name: str, data: bytes, size: int, calendar: Optional[str], old_days: list[str]) -> None:
    """A grown file (``data``, its recorded bytes, intact) only added values after the old last day."""
    if not name.startswith("features/"):
        raise _Rewrite(f"{name}: grew from {len(data)} to {size} bytes (only feature files are appended to)")
    if (size - len(data)) % 4 or len(data) % 4 or len(data) < 4:
        raise _Rewrite(f"{name}: grew from {len(data)} to {size} bytes, not by whole values after a start index")
    if calendar is None:
        raise _Rewrite(f"{name}: grew, and no calendar was recorded")
    start = int(np.frombuffer(data[:4], dtype="<f4")[0])
    last = start + len(data) // 4 - 2  # calendar position of its last recorded value
    if last < len(old_days) - 1:
        when = old_days[last] if 0 <= last else f"position {last}"
        raise _Rewrite(f"{name}: values added after {when}, before the old last day {old_days[-1]}")


def _check_spans(name: str, files: dict, digest: str, root: Path, old_days: list[str], days: list[str],
                 seen: dict) -> int:
    """The instrument file ``name`` changed only by extending spans that ended on the old last day to a new
    day: with those spans ended on the old last day again, its bytes are the recorded ones. Returns how many
    spans were extended."""
    data = _read(os.path.join(root, name))
    if data is None:
        raise _Rewrite(f"{name}: vanished")
    seen[name] = _digest(data)
    if seen[name] == digest:
        return 0
    old_last, new_last = _date(old_days), _date(days)
    if old_last is None:
        raise _Rewrite(f"{name}: changed, and no calendar was recorded")
    new_dates = {day.split()[0] for day in days[len(old_days):]} - {old_last}
    lines = data.decode().splitlines(keepends=True)
    spans = [_SPAN.fullmatch(line) for line in lines]

    def reverted(cut: int = -1) -> str:
        """The file with the spans ending on a new day (and the one at ``cut``) ending on the old last day."""
        return "".join(line if m is None or (m.group(2) not in new_dates and i != cut) else
                       m.group(1) + old_last + m.group(3) for i, (line, m) in enumerate(zip(lines, spans)))

    if _digest(reverted().encode()) == digest:
        return sum(1 for m in spans if m is not None and m.group(2) in new_dates)
    if any(m is None and line.strip() for line, m in zip(lines, spans)):
        raise _Rewrite(f"{name}: a line is not 'code start end'")
    for i, m in enumerate(spans):  # a span that ended on the old last day now ends earlier (a delisting)
        if m is not None and m.group(2) < old_last and _digest(reverted(i).encode()) == digest:
            raise _Rewrite(f"{name}: the span of {m.group(1).split()[0]} now ends on {m.group(2)}, not {old_last}")
    triples = [(m.group(1).split()[0], m.group(1).split()[1], m.group(2)) for m in spans if m is not None]
    raise _Rewrite(_diagnose(name, files, triples, old_last, new_last or old_last))


def _diagnose(name: str, files: dict, spans: list[tuple[str, str, str]], old_last: str, new_last: str) -> str:
    """What most likely changed in an instrument file that is not an append of days (nor one delisting)."""
    recorded = {n.split("/")[1] for n in files if n.startswith(("features/", "financial/")) and n.count("/") == 2}
    listed = {code_to_fname(code).lower(): code for code, _, _ in spans}
    if recorded:  # the record has files of every instrument the market listed (and of any code an expression names)
        added = sorted(code for d, code in listed.items() if d not in recorded)
        if added:
            return f"{name}: {_some(added)} added"
        gone = sorted(d.upper() for d in recorded - set(listed))
        if gone:
            return f"{name}: {_some(gone)} no longer listed"
    for code, start, end in spans:
        if start > old_last:
            return f"{name}: a span of {code} added from {start}"
        if end > new_last:
            return f"{name}: the span of {code} ends on {end}, after the calendar's last day {new_last}"
    return f"{name}: spans changed other than by extending those that ended on {old_last} to a new day"


def _some(codes: list[str]) -> str:
    return ", ".join(codes[:3]) + (f" and {len(codes) - 3} more" if len(codes) > 3 else "")
