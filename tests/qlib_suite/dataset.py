"""A dataset Qlib's own tests can run on, written by :func:`qlib_server.datagen.generate_dataset` and
then shaped to what those tests read (they were written against Qlib's downloadable ``cn`` data):

* a daily calendar from 2005-01-04 to 2021-06-11 (the tests ask for 2005, for 2008-2020, and fit
  normalisers on the last ten trading days, 2021-05-31 to 2021-06-11);
* markets ``all``, ``csi500``, ``csi300`` (300 codes, as many as the index has on most days: a test
  counts them), ``csi100``;
* the codes the tests name: ``SH600519``, ``SH600110``, ``SZ300315`` (csi300 members listed over the
  whole calendar), the benchmark ``SH000300`` (in ``all`` only) and ``SZ300677`` (listed on the
  3001st trading day, in ``all``: a storage test reads before and after its first day);
* a csi300 member listed on 2019-12-02, so that Alpha360's 60-day windows in January 2020 hold NaN,
  and no other NaN from November 2019 to March 2020 (a loader test fills NaN features in January 2020
  and then wants no NaN left: its labels must have none), so no delisting nor suspension then;
* suspensions (a day with every price NaN): a few at random from 2008 on, and one placed where a
  cross-sectional fill test looks for one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qlib_server.datagen import FIELDS, generate_dataset

START, END = "2005-01-04", "2021-06-11"
QUIET = ("2019-11-01", "2020-03-31")
#: codes the tests ask for by name: the name, and whether it is a csi300 member
NAMED = {"SH600519": True, "SH600110": True, "SZ300315": True, "SH000300": False, "SZ300677": False}
#: codes listed late: the code (``None``: a csi300 member of the generator's) and its first trading day
LATE = {"SZ300677": 3000, None: "2019-12-02"}
CSI300 = 300
#: where ``CSZFillna``'s test looks for a suspended stock: the 99th csi300 member (by code) on the 115th day
FILL_DAY, FILL_POSITION = 114, 98
PRICES = ("open", "high", "low", "close", "vwap", "change")


def _read_spans(path: Path) -> dict[str, tuple[str, str]]:
    spans = {}
    for line in path.read_text().splitlines():
        code, first, last = line.split("\t")
        spans[code] = (first, last)
    return spans


def _write_market(path: Path, spans: dict[str, tuple[str, str]], codes: list[str]) -> None:
    path.write_text("".join(f"{code}\t{spans[code][0]}\t{spans[code][1]}\n" for code in sorted(codes)))


def _rename(root: Path, spans: dict[str, tuple[str, str]], codes: list[str], calendar: pd.DatetimeIndex) -> None:
    """Give codes listed over the whole calendar the names in :data:`NAMED` (swapping with a code that
    already has such a name), in place in ``spans`` and ``codes`` (the generated order: its first
    :data:`CSI300` are the csi300 members)."""
    whole = (f"{calendar[0]:%Y-%m-%d}", f"{calendar[-1]:%Y-%m-%d}")
    features = root / "features"
    taken = set(NAMED)
    for name, member in NAMED.items():
        pool = codes[:CSI300] if member else codes[CSI300:]
        source = next(code for code in pool if spans[code] == whole and code not in taken)
        taken.add(source)
        i = codes.index(source)
        if name in spans:  # swap the two codes' files, spans and places
            j = codes.index(name)
            spare = features / "__swap__"
            (features / name.lower()).rename(spare)
            (features / source.lower()).rename(features / name.lower())
            spare.rename(features / source.lower())
            spans[name], spans[source] = spans[source], spans[name]
            codes[i], codes[j] = name, source
        else:
            (features / source.lower()).rename(features / name.lower())
            spans[name] = spans.pop(source)
            codes[i] = name


def _list_late(root: Path, code: str, first: int, spans: dict[str, tuple[str, str]],
               calendar: pd.DatetimeIndex) -> None:
    """``code``'s data and spans begin on calendar day ``first`` (the days before dropped)."""
    for path in (root / "features" / code.lower()).glob("*.day.bin"):
        data = np.fromfile(path, dtype="<f4")
        kept = data[1 + first - int(data[0]):]
        np.concatenate([[first], kept]).astype("<f4").tofile(path)
    spans[code] = (f"{calendar[first]:%Y-%m-%d}", spans[code][1])


def _delist_before(root: Path, code: str, last: int, spans: dict[str, tuple[str, str]],
                   calendar: pd.DatetimeIndex) -> None:
    """``code``'s data and spans end on calendar day ``last`` (the days after dropped)."""
    for path in (root / "features" / code.lower()).glob("*.day.bin"):
        data = np.fromfile(path, dtype="<f4")
        data[: 2 + last - int(data[0])].tofile(path)
    spans[code] = (spans[code][0], f"{calendar[last]:%Y-%m-%d}")


def _suspend(root: Path, code: str, day: int) -> None:
    """Every price of ``code`` NaN on calendar day ``day`` (the volume too, as on a suspension)."""
    for field in (*PRICES, "volume"):
        path = root / "features" / code.lower() / f"{field}.day.bin"
        data = np.fromfile(path, dtype="<f4")
        position = 1 + day - int(data[0])
        if 1 <= position < len(data):
            data[position] = np.nan
            data.tofile(path)


def generate_qlib_test_data(root: str | Path, instruments: int = 330, seed: int = 22) -> Path:
    """Write the dataset under ``root`` (see the module's docstring) and return ``root``."""
    if instruments < CSI300 + 10:
        raise ValueError(f"Qlib's tests need at least {CSI300 + 10} instruments (csi300 and the others)")
    root = Path(root)
    calendar = pd.bdate_range(START, END)
    generate_dataset(root, instruments=instruments, start=START, days=len(calendar), seed=seed, markets={})
    assert set(FIELDS) >= {"open", "close", "high", "low", "volume", "factor", "vwap", "change"}
    markets = root / "instruments"
    spans = _read_spans(markets / "all.txt")
    codes = list(spans)
    _rename(root, spans, codes, calendar)
    members = codes[:CSI300]
    whole = (f"{calendar[0]:%Y-%m-%d}", f"{calendar[-1]:%Y-%m-%d}")
    for code, first in LATE.items():
        if code is None:
            code = next(c for c in members if c not in NAMED and spans[c] == whole)
        if isinstance(first, str):
            first = int(calendar.searchsorted(pd.Timestamp(first)))
        _list_late(root, code, first, spans, calendar)
    before_quiet = int(calendar.searchsorted(pd.Timestamp(QUIET[0]))) - 1
    for code, (_, last) in list(spans.items()):
        if QUIET[0] <= last <= QUIET[1]:
            _delist_before(root, code, before_quiet, spans, calendar)
    stocks = [code for code in codes if code != "SH000300"]
    _write_market(markets / "all.txt", spans, codes)
    _write_market(markets / "csi500.txt", spans, stocks)
    _write_market(markets / "csi300.txt", spans, members)
    _write_market(markets / "csi100.txt", spans, sorted(members)[:100])

    rng = np.random.default_rng(seed)
    days = np.flatnonzero((calendar >= "2008-01-01") & ~((calendar >= QUIET[0]) & (calendar <= QUIET[1])))
    for code in stocks:
        if code in NAMED:
            continue
        for day in rng.choice(days, 3):
            _suspend(root, code, int(day))
    fill_date = f"{calendar[FILL_DAY]:%Y-%m-%d}"
    listed = sorted(c for c in members if spans[c][0] <= fill_date <= spans[c][1])
    _suspend(root, listed[FILL_POSITION], FILL_DAY)
    return root
