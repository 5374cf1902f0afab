"""The request bodies of the scenarios: a hot set, a source of always-new feature sets, and a ~100-request universe.

Dates and markets fit both the synthetic dataset (``qlib_server.datagen``: business days from 2018-01-02,
markets all, csi300, csi100) and real Qlib cn data.
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Optional

START, END = "2018-03-01", "2020-06-30"

HOT_CALENDAR = {"start_time": START, "end_time": END, "freq": "day", "future": False}
HOT_INSTRUMENTS = {"instruments": {"market": "csi300", "filter_pipe": []}, "start_time": START, "end_time": END,
                   "freq": "day", "as_list": True}
HOT_FEATURES = {"instruments": {"market": "csi100", "filter_pipe": []}, "fields": ["$close", "Mean($close, 5)"],
                "start_time": START, "end_time": END, "freq": "day", "disk_cache": 1}

# Window and shift of the cold feature sets: 60,000 combinations, each counter value a new one. The
# counter starts at a random point so that repeated runs against one server mostly miss its caches.
_WINDOWS, _SHIFTS = 240, 250
_cold_counter = itertools.count(random.SystemRandom().randrange(_WINDOWS * _SHIFTS))


def cold_features(n: Optional[int] = None) -> dict:
    """A feature request whose fields none of the previous 60,000 calls produced (a fresh computation)."""
    n = (next(_cold_counter) if n is None else n) % (_WINDOWS * _SHIFTS)
    window, shift = 2 + n % _WINDOWS, 1 + n // _WINDOWS
    fields = ["$close", f"Mean($close, {window})", f"Ref($close, {shift})"]
    return {**HOT_FEATURES, "fields": fields}


_CALENDAR_RANGES = [(None, None), ("2018-01-01", "2018-12-31"), ("2019-01-01", "2019-12-31"),
                    ("2020-01-01", "2020-06-30"), (START, END), ("2018-06-01", "2019-06-30"),
                    ("2019-06-01", None), (None, "2019-03-31")]
_MARKETS = ["all", "csi300", "csi100"]
_INSTRUMENT_RANGES = [(None, None), ("2019-01-01", "2019-12-31"), (START, END)]
_FIELD_SETS = [
    ["$close"], ["$open", "$close"], ["$close", "$volume"], ["$high", "$low"], ["Mean($close, 5)"],
    ["Mean($close, 10)"], ["Mean($close, 20)"], ["Std($close, 20)"], ["Ref($close, 1)"],
    ["$close/Ref($close, 1)-1"], ["Max($high, 10)", "Min($low, 10)"], ["Corr($close, $volume, 10)"],
    ["EMA($close, 12)", "EMA($close, 26)"], ["Sum($volume, 5)"], ["Delta($close, 5)"], ["WMA($close, 10)"],
    ["Rank($close, 20)"], ["Slope($close, 20)"], ["Mean($volume, 20)", "Std($volume, 20)"],
    ["Quantile($close, 20, 0.8)"], ["Abs($change)"], ["$vwap", "$factor"], ["IdxMax($high, 20)"],
    ["Cov($high, $low, 10)"],
]


def mix_universe() -> list[tuple[str, dict]]:
    """About 100 distinct requests (8 calendars, 20 instrument lists, 72 feature sets) in a fixed shuffled order."""
    requests: list[tuple[str, dict]] = []
    for start, end in _CALENDAR_RANGES:
        requests.append(("calendar", {"start_time": start, "end_time": end, "freq": "day", "future": False}))
    for market, as_list, (start, end) in itertools.product(_MARKETS, (True, False), _INSTRUMENT_RANGES):
        requests.append(("instrument", {"instruments": {"market": market, "filter_pipe": []}, "start_time": start,
                                        "end_time": end, "freq": "day", "as_list": as_list}))
    for as_list in (True, False):
        name_filter = {"filter_type": "NameDFilter", "name_rule_re": "SH[0-9]{4}", "filter_start_time": None,
                       "filter_end_time": None}
        requests.append(("instrument", {"instruments": {"market": "csi300", "filter_pipe": [name_filter]},
                                        "start_time": START, "end_time": END, "freq": "day", "as_list": as_list}))
    for market, fields in itertools.product(_MARKETS, _FIELD_SETS):
        requests.append(("feature", {"instruments": {"market": market, "filter_pipe": []}, "fields": fields,
                                     "start_time": START, "end_time": END, "freq": "day", "disk_cache": 1}))
    random.Random(7).shuffle(requests)
    return requests


class ZipfChooser:
    """Picks item ``k`` (0-based rank) with probability proportional to ``1 / (k + 1) ** exponent``."""

    def __init__(self, items: list, exponent: float = 1.1, rng: Optional[random.Random] = None):
        self.items = items
        self.cumulative = list(itertools.accumulate(1.0 / (k + 1) ** exponent for k in range(len(items))))
        self.rng = rng or random.Random()

    def choose(self):
        point = self.rng.random() * self.cumulative[-1]
        return self.items[min(bisect.bisect_right(self.cumulative, point), len(self.items) - 1)]
