"""Data updates on a dataset of :mod:`qlib_server.datagen`, as a data provider makes them.

:func:`append_days` is the daily update (only new rows: a cache can be extended); every other operation
changes the past (a cache must be recomputed). Each is deterministic: the same arguments on the same data
give the same bytes. Days are calendar positions (0 is the first day of ``calendars/day.txt``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .datagen import FIELDS, _write_bin

PRICES = ("open", "high", "low", "close", "vwap")


def read_calendar(root: Path) -> list[str]:
    return (root / "calendars" / "day.txt").read_text().split()


def read_spans(path: Path) -> list[list[str]]:
    """An instrument file's spans: ``[code, start, end]`` per line."""
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def write_spans(path: Path, spans: Iterable[list[str]]) -> None:
    path.write_text("".join("\t".join(span) + "\n" for span in spans))


def read_bin(path: Path) -> tuple[int, np.ndarray]:
    """A feature file's start index (calendar position of its first value) and values."""
    data = np.fromfile(path, dtype="<f4")
    return int(data[0]), data[1:].astype(np.float64)


def _directory(root: Path, code: str) -> Path:
    return root / "features" / code.lower()


def _fields(root: Path) -> list[str]:
    """The fields of the dataset: those of any instrument's directory (each has every field)."""
    names = {p.name.split(".")[0] for d in (root / "features").iterdir() for p in d.glob("*.day.bin")}
    return sorted(names) or list(FIELDS)


def _prices(rng: np.random.Generator, last_close: float, factor: float, n: int) -> dict[str, np.ndarray]:
    """``n`` days of every field of :data:`FIELDS` after a day that closed at ``last_close``."""
    close = last_close * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    open_ = close * (1 + rng.normal(0, 0.005, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.01, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.01, n)))
    change = close / np.concatenate([[last_close], close[:-1]]) - 1
    return {"open": open_, "high": high, "low": low, "close": close, "vwap": (high + low + close) / 3,
            "volume": rng.integers(1_000, 1_000_000, n).astype(float), "factor": np.full(n, factor),
            "change": change}


def append_days(root: str | Path, days: int, seed: int = 1, suspended: Iterable[str] = ()) -> Path:
    """The daily update: ``days`` business days appended to the calendar; each field file that reaches the
    old last day grows by their values (appended in place) and each span ending on it is extended to the
    new last day, in every market file. Instruments delisted earlier are untouched. The instruments in
    ``suspended`` stay listed (spans extended) but get no values yet (their files do not grow)."""
    root, rng = Path(root), np.random.default_rng(seed)
    calendar = read_calendar(root)
    new_days = [f"{d:%Y-%m-%d}" for d in pd.bdate_range(pd.Timestamp(calendar[-1]) + pd.offsets.BDay(1),
                                                        periods=days)]
    skip = {code.lower() for code in suspended}
    for directory in sorted((root / "features").iterdir()):
        ending = {}
        for path in sorted(directory.glob("*.day.bin")):
            start, values = read_bin(path)
            if start + len(values) == len(calendar) and directory.name not in skip:
                ending[path.name.split(".")[0]] = (path, values)
        if not ending:
            continue
        last = {field: values[-1] for field, (_, values) in ending.items()}
        model = _prices(rng, last.get("close", 10.0), last.get("factor", 1.0), days)
        for field, (path, values) in sorted(ending.items()):
            new = model[field] if field in model else values[-1] * np.exp(np.cumsum(rng.normal(0, 0.01, days)))
            with open(path, "ab") as f:
                new.astype("<f4").tofile(f)
    for path in sorted((root / "instruments").glob("*.txt")):
        spans = read_spans(path)
        if any(end == calendar[-1] for _, _, end in spans):
            write_spans(path, ([c, s, new_days[-1] if e == calendar[-1] else e] for c, s, e in spans))
    (root / "calendars" / "day.txt").write_text("\n".join(calendar + new_days) + "\n")
    return root


def rewrite_value(root: str | Path, code: str, field: str, day_index: int, value: float) -> Path:
    """A correction: the value of ``field`` of ``code`` on the day at ``day_index`` rewritten in place (the
    file keeps its size)."""
    root = Path(root)
    path = _directory(root, code) / f"{field}.day.bin"
    start, values = read_bin(path)
    if not start <= day_index < start + len(values):
        raise IndexError(f"{path} holds days {start}..{start + len(values) - 1}, not {day_index}")
    with open(path, "r+b") as f:
        f.seek(4 * (day_index - start + 1))
        f.write(np.array([value], dtype="<f4").tobytes())
    return root


def list_instrument(root: str | Path, market: str, code: str, first_day: int = 0, seed: int = 2) -> Path:
    """``code`` listed in ``market`` (and in ``all``) from the day at ``first_day`` to the last day: a span in
    each, and a file of every field from ``first_day`` on unless it already has its files (joining a market)."""
    root, rng = Path(root), np.random.default_rng(seed)
    calendar = read_calendar(root)
    directory = _directory(root, code)
    if not directory.exists():
        directory.mkdir(parents=True)
        model = _prices(rng, 10.0, 1.0, len(calendar) - first_day)
        for field in _fields(root):
            values = model[field] if field in model else rng.random(len(calendar) - first_day)
            _write_bin(directory / f"{field}.day.bin", first_day, values)
    for name in dict.fromkeys((market, "all")):
        path = root / "instruments" / f"{name}.txt"
        spans = read_spans(path) if path.exists() else []
        if name == market or all(c != code for c, _, _ in spans):
            write_spans(path, [*spans, [code, calendar[first_day], calendar[-1]]])
    return root


def delist_instrument(root: str | Path, market: str, code: str, last_day: int | None = None) -> Path:
    """``code`` leaves ``market``: its spans are removed (``last_day`` None), or end on the day at ``last_day``
    (spans starting after it removed). Its files stay, as history does."""
    root = Path(root)
    path = root / "instruments" / f"{market}.txt"
    end = None if last_day is None else read_calendar(root)[last_day]
    spans = []
    for c, s, e in read_spans(path):
        if c != code:
            spans.append([c, s, e])
        elif end is not None and s <= end:
            spans.append([c, s, min(e, end)])
    write_spans(path, spans)
    return root


def change_factor(root: str | Path, code: str, from_day: int, ratio: float) -> Path:
    """An adjustment (a split or dividend found late): from the day at ``from_day`` on, ``code``'s ``factor``
    is multiplied by ``ratio``, its prices too and its volume divided by it (Qlib's adjusted prices are raw
    x factor, its volume raw / factor), and ``change`` on ``from_day`` follows the new close."""
    root = Path(root)
    directory = _directory(root, code)
    start, close = read_bin(directory / "close.day.bin")
    at = from_day - start
    if not 0 <= at < len(close):
        raise IndexError(f"{code} has values for days {start}..{start + len(close) - 1}, not {from_day}")
    for field in ("factor", *PRICES, "volume"):
        path = directory / f"{field}.day.bin"
        if path.exists():
            _, values = read_bin(path)
            values[at:] = values[at:] / ratio if field == "volume" else values[at:] * ratio
            _write_bin(path, start, values)
    if at > 0 and (directory / "change.day.bin").exists():
        _, change = read_bin(directory / "change.day.bin")
        change[at] = close[at] * ratio / close[at - 1] - 1
        _write_bin(directory / "change.day.bin", start, change)
    return root


def add_field(root: str | Path, field: str, seed: int = 3) -> Path:
    """A new field for every instrument (over the days of its ``close``): ``features/<code>/<field>.day.bin``
    written where missing."""
    root, rng = Path(root), np.random.default_rng(seed)
    for directory in sorted((root / "features").iterdir()):
        path = directory / f"{field}.day.bin"
        if not path.exists():
            start, close = read_bin(directory / "close.day.bin")
            _write_bin(path, start, rng.random(len(close)))
    return root
