"""Synthetic dataset in Qlib's on-disk format, for tests, demos and benchmarks.

Layout written under ``root``::

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
        n = last - first + 1
        close = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
        open_ = close * (1 + rng.normal(0, 0.005, n))
        high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.01, n)))
        low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.01, n)))
        volume = rng.integers(1_000, 1_000_000, n).astype(float)
        factor = np.full(n, 1.0 + i / 100)
        change = np.concatenate([[np.nan], close[1:] / close[:-1] - 1])
        vwap = (high + low + close) / 3
        for name, values in zip(FIELDS, (open_, high, low, close, volume, factor, change, vwap)):
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


def extend_dataset(root: str | Path, days: int, seed: int = 1) -> Path:
    """Append ``days`` business days to a dataset, as a daily data update does: the calendar grows,
    instruments trading on the last day go on trading, history is left untouched
    (:func:`qlib_server.datagen_updates.append_days`, where the other data updates are)."""
    from .datagen_updates import append_days

    return append_days(root, days, seed)
