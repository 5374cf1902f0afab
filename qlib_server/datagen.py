"""Synthetic dataset in Qlib's on-disk format, for tests, demos and benchmarks.

Layout written under ``root`` (:func:`generate_dataset`; :func:`generate_minute_dataset` writes the same
with ``1min`` for ``day``: a calendar of minute bars, ``YYYY-MM-DD HH:MM:SS``, and spans in that form, as
Qlib's ``dump_bin`` writes high-frequency data)::

    calendars/day.txt                       one trading day per line
    instruments/<market>.txt                code<TAB>start<TAB>end, one span per line
    features/<code>/<field>.day.bin         little-endian float32, first value = start index

Every number comes from a seeded generator, so the same arguments give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FIELDS = ("open", "high", "low", "close", "volume", "factor", "change", "vwap")


def _write_bin(path: Path, start_index: int, values: np.ndarray) -> None:
    data = np.concatenate([[start_index], values]).astype("<f4")
    data.tofile(path)


def _bars(rng: np.random.Generator, n: int, i: int, step: float) -> dict[str, np.ndarray]:
    """``n`` bars of each of :data:`FIELDS` for the ``i``-th instrument, its close a random walk of ``step``."""
    close = 10 * np.exp(np.cumsum(rng.normal(0, step, n)))
    open_ = close * (1 + rng.normal(0, step / 4, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, step / 2, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, step / 2, n)))
    volume = rng.integers(1_000, 1_000_000, n).astype(float)
    factor = np.full(n, 1.0 + i / 100)
    change = np.concatenate([[np.nan], close[1:] / close[:-1] - 1])
    vwap = (high + low + close) / 3
    return dict(zip(FIELDS, (open_, high, low, close, volume, factor, change, vwap)))


def generate_dataset(
    root: str | Path,
    *,
    instruments: int = 20,
    start: str = "2018-01-02",
    days: int = 750,
    seed: int = 0,
    markets: dict[str, int] | None = None,
) -> Path:
    """Write a Qlib dataset of ``instruments`` codes over ``days`` business days; return its root.

    ``markets`` maps a market name to how many instruments it holds (the first ones); ``all`` holds
    every instrument with its own listing span. Some instruments list late, some delist early, and
    the second half of each extra market leaves and re-enters it, so span lists have several items.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    calendar = pd.bdate_range(start=start, periods=days)
    markets = markets if markets is not None else {"csi300": max(1, instruments * 3 // 4),
                                                   "csi100": max(1, instruments // 4)}

    (root / "calendars").mkdir(parents=True, exist_ok=True)
    (root / "instruments").mkdir(parents=True, exist_ok=True)
    (root / "calendars" / "day.txt").write_text("\n".join(d.strftime("%Y-%m-%d") for d in calendar) + "\n")

    codes = [f"SH{600000 + i:06d}" if i % 2 == 0 else f"SZ{i:06d}" for i in range(instruments)]
    spans: dict[str, tuple[int, int]] = {}
    for i, code in enumerate(codes):
        first = 0 if i % 5 else int(rng.integers(0, days // 3))
        last = days - 1 if i % 7 else int(rng.integers(days * 2 // 3, days))
        spans[code] = (first, last)
        directory = root / "features" / code.lower()
        directory.mkdir(parents=True, exist_ok=True)
        for name, values in _bars(rng, last - first + 1, i, 0.02).items():
            _write_bin(directory / f"{name}.day.bin", first, values)

    def line(code: str, a: int, b: int) -> str:
        return f"{code}\t{calendar[a]:%Y-%m-%d}\t{calendar[b]:%Y-%m-%d}"

    (root / "instruments" / "all.txt").write_text("\n".join(line(c, *spans[c]) for c in codes) + "\n")
    for market, size in markets.items():
        lines = []
        for j, code in enumerate(codes[:size]):
            first, last = spans[code]
            if j >= size // 2 and last - first > 40:
                gap_a = first + (last - first) // 3
                gap_b = first + 2 * (last - first) // 3
                lines += [line(code, first, gap_a), line(code, gap_b, last)]
            else:
                lines.append(line(code, first, last))
        (root / "instruments" / f"{market}.txt").write_text("\n".join(lines) + "\n")
    return root


#: the minute bars of a trading day (240, as in Qlib's cn 1min data): 09:31-11:30 and 13:01-15:00
MINUTE_BARS = tuple(pd.timedelta_range("09:31:00", "11:30:00", freq="min")) + \
    tuple(pd.timedelta_range("13:01:00", "15:00:00", freq="min"))
MINUTE_FORMAT = "%Y-%m-%d %H:%M:%S"


def generate_minute_dataset(
    root: str | Path,
    *,
    instruments: int = 8,
    start: str = "2020-03-02",
    days: int = 15,
    seed: int = 0,
    markets: dict[str, int] | None = None,
) -> Path:
    """Write a Qlib dataset of ``1min`` bars (240 a trading day) of ``instruments`` codes over ``days``
    business days; return its root. As :func:`generate_dataset`: some instruments list late (the first
    bar of a later day) and some delist early (the last bar of an earlier day), the second half of each
    extra market leaves and re-enters it, and one instrument in three has a morning of NaN bars (suspended)."""
    if days < 3:
        raise ValueError("a minute dataset spans at least 3 days (late listings, early delistings)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    days_index = pd.bdate_range(start=start, periods=days)
    calendar = pd.DatetimeIndex([day + bar for day in days_index for bar in MINUTE_BARS])
    per_day, total = len(MINUTE_BARS), len(calendar)
    markets = markets if markets is not None else {"csi300": max(1, instruments * 3 // 4)}

    for name in ("calendars", "instruments"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "calendars" / "1min.txt").write_text("\n".join(t.strftime(MINUTE_FORMAT) for t in calendar) + "\n")

    codes = [f"SH{600000 + i:06d}" if i % 2 == 0 else f"SZ{i:06d}" for i in range(instruments)]
    spans: dict[str, tuple[int, int]] = {}
    for i, code in enumerate(codes):
        first = 0 if i % 5 else per_day * int(rng.integers(1, max(2, days // 3)))
        last = total - 1 if i % 7 else per_day * int(rng.integers(days * 2 // 3, days)) - 1
        spans[code] = (first, last)
        directory = root / "features" / code.lower()
        directory.mkdir(parents=True, exist_ok=True)
        bars = _bars(rng, last - first + 1, i, 0.001)
        if i % 3 == 1:  # the morning of its middle day suspended: every field NaN
            middle = (last - first) // 2 // per_day * per_day
            morning = slice(middle, middle + per_day // 2)
            for values in bars.values():
                values[morning] = np.nan
        for name, values in bars.items():
            _write_bin(directory / f"{name}.1min.bin", first, values)

    def line(code: str, a: int, b: int) -> str:
        return f"{code}\t{calendar[a].strftime(MINUTE_FORMAT)}\t{calendar[b].strftime(MINUTE_FORMAT)}"

    (root / "instruments" / "all.txt").write_text("\n".join(line(c, *spans[c]) for c in codes) + "\n")
    for market, size in markets.items():
        lines = []
        for j, code in enumerate(codes[:size]):
            first, last = spans[code]
            if j >= size // 2 and last - first > 3 * per_day:  # out from a third to two thirds, mid-session
                lines += [line(code, first, first + (last - first) // 3 + 17),
                          line(code, first + 2 * (last - first) // 3 - 61, last)]
            else:
                lines.append(line(code, first, last))
        (root / "instruments" / f"{market}.txt").write_text("\n".join(lines) + "\n")
    return root


def extend_dataset(root: str | Path, days: int, seed: int = 1) -> Path:
    """Append ``days`` business days to a dataset, as a daily data update does: the calendar grows,
    instruments trading on the last day go on trading, history is left untouched
    (:func:`qlib_server.datagen_updates.append_days`, where the other data updates are)."""
    from .datagen_updates import append_days

    return append_days(root, days, seed)
