"""The request bodies of the scenarios: a hot set, a source of always-new feature sets, and a ~100-request universe.

Everything is built from a :class:`~loadtests._profile.DataProfile` (the server's calendar, markets and the
base fields), so that each request asks for what the data holds: dates are trading days placed by their
position in the calendar (the hot range runs from 5.6 % to 86.8 % of it, as 2018-03-01 .. 2020-06-30 did in the
synthetic 2018 dataset), markets are the server's own (largest first), and rolling windows fit the calendar.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from typing import Optional

try:  # imported as part of the loadtests package
    from ._profile import DataProfile
except ImportError:  # imported by a locustfile that locust loaded as a top-level module
    from _profile import DataProfile

Span = tuple[Optional[float], Optional[float]]
HOT_SPAN: tuple[float, float] = (0.056, 0.868)
# Calendar ranges as fractions of the calendar; None: an open end (the range's end when it was cut).
_CALENDAR_RANGES: list[Span] = [(None, None), (0.0, 0.33), (0.33, 0.67), (0.67, 0.87), HOT_SPAN, (0.2, 0.5),
                                (0.5, None), (None, 0.42)]
# Instrument-list ranges, one set per use of a market: a profile with fewer than three markets uses its
# markets again with other ranges, so the universe keeps its size and its mix of kinds.
_INSTRUMENT_RANGES: list[list[Span]] = [[(None, None), (0.33, 0.67), HOT_SPAN], [(0.0, 0.5), (0.5, None), (0.1, 0.6)],
                      [(0.25, 0.75), (None, 0.33), (0.67, None)]]
_FEATURE_RANGES: list[Span] = [HOT_SPAN, (0.1, 0.6), (0.4, 0.9)]
_MARKET_SLOTS = 3
_FIELD_SETS = [
    ["$close"], ["$open", "$close"], ["$close", "$volume"], ["$high", "$low"], ["Mean($close, 5)"],
    ["Mean($close, 10)"], ["Mean($close, 20)"], ["Std($close, 20)"], ["Ref($close, 1)"],
    ["$close/Ref($close, 1)-1"], ["Max($high, 10)", "Min($low, 10)"], ["Corr($close, $volume, 10)"],
    ["EMA($close, 12)", "EMA($close, 26)"], ["Sum($volume, 5)"], ["Delta($close, 5)"], ["WMA($close, 10)"],
    ["Rank($close, 20)"], ["Slope($close, 20)"], ["Mean($volume, 20)", "Std($volume, 20)"],
    ["Quantile($close, 20, 0.8)"], ["Abs($change)"], ["$vwap", "$factor"], ["IdxMax($high, 20)"],
    ["Cov($high, $low, 10)"],
]
_FIELD = re.compile(r"\$\w+")


def field_sets(fields: tuple[str, ...], count: int = len(_FIELD_SETS)) -> list[list[str]]:
    """The scenarios' field sets that use only ``fields``, topped up to ``count`` with rolling means of them."""
    available = set(fields)
    sets = [s for s in _FIELD_SETS if all(f in available for e in s for f in _FIELD.findall(e))]
    extra = (f"{op}({field}, {window})" for window in (3, 5, 10, 20, 30, 60) for op in ("Mean", "Std")
             for field in fields)
    while len(sets) < count:
        candidate = [next(extra)]
        if candidate not in sets:
            sets.append(candidate)
    return sets[:count]


class Workload:
    """The requests of the three scenarios for one :class:`DataProfile`."""

    def __init__(self, profile: DataProfile):
        self.profile = profile
        self.start, self.end = profile.day(HOT_SPAN[0]), profile.day(HOT_SPAN[1])
        self.price = "$close" if "$close" in profile.fields else profile.fields[0]
        markets = profile.markets
        # csi300 and csi100 of a cn dataset (all, csi300, csi100 by size); one market serves all three uses
        self.list_market = markets[1] if len(markets) > 1 else markets[0]
        self.feature_market = markets[-1]
        self.hot_calendar = {"start_time": self.start, "end_time": self.end, "freq": "day", "future": False}
        self.hot_instruments = {"instruments": {"market": self.list_market, "filter_pipe": []},
                                "start_time": self.start, "end_time": self.end, "freq": "day", "as_list": True}
        self.hot_features = {"instruments": {"market": self.feature_market, "filter_pipe": []},
                             "fields": [self.price, f"Mean({self.price}, 5)"], "start_time": self.start,
                             "end_time": self.end, "freq": "day", "disk_cache": 1}
        # Window and shift of the cold feature sets (60,000 combinations on a calendar of 750 days or more;
        # windows and shifts stay within a third of the calendar). The counter starts at a random point so
        # that repeated runs against one server mostly miss its caches.
        third = max(1, len(profile.days) // 3)
        self.windows, self.shifts = min(240, max(2, third - 1)), min(250, third)
        self._cold_counter = itertools.count(random.SystemRandom().randrange(self.windows * self.shifts))

    def _range(self, span: Span) -> tuple[Optional[str], Optional[str]]:
        """Dates of a (start, end) pair of fractions; an open end stays open unless the range was cut."""
        lo, hi = span
        if lo is None:
            lo_date = self.profile.first if self.profile.bounded else None
        else:
            lo_date = self.profile.day(lo)
        if hi is None:
            hi_date = self.profile.last if self.profile.bounded else None
        else:
            hi_date = self.profile.day(hi)
        return lo_date, hi_date

    def describe(self) -> str:
        return (f"{self.profile.describe()}\nqlib load: hot range {self.start} .. {self.end}; hot instrument list "
                f"{self.list_market}, hot features {self.feature_market}, mix markets {', '.join(self._slots())}; "
                f"cold windows 2..{self.windows + 1}, shifts 1..{self.shifts}")

    def cold_features(self, n: Optional[int] = None) -> dict:
        """A feature request whose fields none of the previous windows x shifts calls produced (a fresh computation)."""
        n = (next(self._cold_counter) if n is None else n) % (self.windows * self.shifts)
        window, shift = 2 + n % self.windows, 1 + n // self.windows
        price = self.price
        fields = [price, f"Mean({price}, {window})", f"Ref({price}, {shift})"]
        return {**self.hot_features, "fields": fields}

    def _slots(self) -> list[str]:
        markets = self.profile.markets
        return [markets[i % len(markets)] for i in range(_MARKET_SLOTS)]

    def mix_universe(self) -> list[tuple[str, dict]]:
        """About 100 distinct requests (8 calendars, 20 instrument lists, 72 feature sets) in a fixed shuffled order."""
        requests: list[tuple[str, dict]] = []
        for span in _CALENDAR_RANGES:
            start, end = self._range(span)
            requests.append(("calendar", {"start_time": start, "end_time": end, "freq": "day", "future": False}))
        markets = self.profile.markets
        for slot, market in enumerate(self._slots()):
            for as_list, span in itertools.product((True, False), _INSTRUMENT_RANGES[slot // len(markets)]):
                start, end = self._range(span)
                requests.append(("instrument", {"instruments": {"market": market, "filter_pipe": []},
                                                "start_time": start, "end_time": end, "freq": "day",
                                                "as_list": as_list}))
        codes = self.profile.sample_codes
        sample = codes[self.profile.markets.index(self.list_market)] if codes else "SH"
        for as_list in (True, False):  # the codes that start as the market's first one does (SH[0-9]{4} on cn data)
            name_filter = {"filter_type": "NameDFilter", "name_rule_re": f"{re.escape(sample[:2])}.*",
                           "filter_start_time": None, "filter_end_time": None}
            requests.append(("instrument", {"instruments": {"market": self.list_market, "filter_pipe": [name_filter]},
                                            "start_time": self.start, "end_time": self.end, "freq": "day",
                                            "as_list": as_list}))
        for slot, market in enumerate(self._slots()):
            start, end = self._range(_FEATURE_RANGES[slot // len(markets)])
            for fields in field_sets(self.profile.fields):
                requests.append(("feature", {"instruments": {"market": market, "filter_pipe": []}, "fields": fields,
                                             "start_time": start, "end_time": end, "freq": "day", "disk_cache": 1}))
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
