"""What the server's data holds, read over the Socket.IO protocol before a run: its calendar and its markets.

The protocol lists no instrument files, but an ``instrument_request`` for a market without one is answered
with an error (``unknown market``): :func:`discover` asks for the whole calendar, then for each candidate
market's instrument list, and keeps the markets that answer with at least one instrument. Markets, the date
range and the base fields may also be given (``--qlib-markets``/``QLIB_LOAD_MARKETS`` and so on, see
:mod:`loadtests.scenarios`); given markets are checked the same way, and a date range is cut to the calendar.

No Locust import here (importing locust monkey-patches the process), so tests and the runner can use it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

try:  # imported as part of the loadtests package
    from ._connection import QlibConnection
except ImportError:  # imported by a locustfile that locust loaded as a top-level module
    from _connection import QlibConnection

#: markets probed when none are given (plus any given ones)
CANDIDATE_MARKETS = ("all", "csi300", "csi100", "csi500", "sp500", "nasdaq100")
#: the base fields the scenarios combine when none are given (Qlib's daily fields)
DEFAULT_FIELDS = ("$open", "$high", "$low", "$close", "$volume", "$factor", "$change", "$vwap")
#: at least this many trading days are needed to build the scenarios' date ranges
MIN_DAYS = 10


class DataProfileError(RuntimeError):
    """The server's data cannot carry the scenarios (no calendar, no market, an empty range)."""


@dataclass(frozen=True)
class DataProfile:
    """The trading days, markets (largest first, with their sizes) and base fields the scenarios use.

    ``bounded`` says whether the range was cut by a given start or end: then requests name its ends
    instead of asking for the whole calendar with open ends.
    """

    days: tuple[str, ...]
    markets: tuple[str, ...]
    sizes: tuple[int, ...]
    fields: tuple[str, ...]
    sample_codes: tuple[str, ...] = ()
    bounded: bool = False

    def __post_init__(self):
        if len(self.days) < MIN_DAYS:
            raise DataProfileError(f"{len(self.days)} trading days in the chosen range; the scenarios need {MIN_DAYS}")
        if not self.markets:
            raise DataProfileError("no market with instruments")
        if not self.fields:
            raise DataProfileError("no fields")

    @property
    def first(self) -> str:
        return self.days[0]

    @property
    def last(self) -> str:
        return self.days[-1]

    def day(self, fraction: float) -> str:
        """The trading day ``fraction`` of the way through the range (0 the first, 1 the last)."""
        return self.days[round(min(max(fraction, 0.0), 1.0) * (len(self.days) - 1))]

    def describe(self) -> str:
        markets = ", ".join(f"{m} ({n})" for m, n in zip(self.markets, self.sizes))
        return (f"qlib load: markets {markets}; dates {self.first} .. {self.last} ({len(self.days)} trading days"
                f"{', cut by option' if self.bounded else ''}); fields {' '.join(self.fields)}")


def split_list(value: Optional[str | Sequence[str]]) -> list[str]:
    """``"a, b c"`` or ``["a", "b"]`` → ``["a", "b", "c"]`` (empty for None or "")."""
    if not value:
        return []
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return [item.strip() for item in value if item.strip()]


def cut_calendar(days: Sequence[str], start: Optional[str], end: Optional[str]) -> list[str]:
    """The days within [start, end] (ISO dates; either may be None)."""
    days = [d[:10] for d in days]
    lo = bisect.bisect_left(days, start[:10]) if start else 0
    hi = bisect.bisect_right(days, end[:10]) if end else len(days)
    return days[lo:hi]


def _checked(answer: dict, what: str):
    if answer["status"] != 0:
        raise DataProfileError(f"{what}: status {answer['status']}: {answer.get('detailed_info')}")
    return answer["result"]


def discover(url: str, markets: Optional[str | Sequence[str]] = None, start: Optional[str] = None,
             end: Optional[str] = None, fields: Optional[str | Sequence[str]] = None,
             timeout: float = 60.0, connection: Optional[QlibConnection] = None) -> DataProfile:
    """Ask the server at ``url`` for its calendar and markets; return the profile the scenarios build on.

    ``markets`` given: exactly those (each must answer with instruments). Otherwise the
    :data:`CANDIDATE_MARKETS` that the server has.
    """
    own = connection is None
    connection = connection or QlibConnection(url, 10.0)
    try:
        whole = {"start_time": None, "end_time": None, "freq": "day", "future": False}
        calendar = _checked(connection.request("calendar", whole, timeout), "calendar_request")
        days = cut_calendar(calendar, start, end)
        if not days:
            runs = f"{calendar[0][:10]} .. {calendar[-1][:10]}" if calendar else "empty"
            raise DataProfileError(f"no trading day in {start or '(first)'} .. {end or '(last)'}: the calendar "
                                   f"runs {runs}")
        given = split_list(markets)
        found: list[tuple[int, str, str]] = []
        for market in given or CANDIDATE_MARKETS:
            body = {"instruments": {"market": market, "filter_pipe": []}, "start_time": days[0],
                    "end_time": days[-1], "freq": "day", "as_list": True}
            answer = connection.request("instrument", body, timeout)
            codes = answer.get("result") if answer["status"] == 0 else None
            if codes:
                found.append((len(codes), market, sorted(codes)[0]))
            elif given:
                why = answer.get("detailed_info") if answer["status"] else "no instrument in the range"
                raise DataProfileError(f"market {market!r}: {why}")
        if not found:
            raise DataProfileError(f"none of the markets {', '.join(CANDIDATE_MARKETS)} has instruments in "
                                   f"{days[0]} .. {days[-1]}; name the server's markets with QLIB_LOAD_MARKETS")
        found.sort(key=lambda item: -item[0])  # stable: equal sizes keep the probing order
        return DataProfile(days=tuple(days), markets=tuple(m for _, m, _ in found),
                           sizes=tuple(n for n, _, _ in found), fields=tuple(split_list(fields) or DEFAULT_FIELDS),
                           sample_codes=tuple(c for _, _, c in found), bounded=bool(start or end))
    finally:
        if own:
            connection.close()
