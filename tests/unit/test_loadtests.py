"""The load scenarios build every request from what the server's data holds (issue 19, part 4)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from loadtests._profile import CANDIDATE_MARKETS, DataProfile, DataProfileError, cut_calendar, discover
from loadtests._workload import Workload, field_sets

DAYS_2012 = tuple(d.strftime("%Y-%m-%d") for d in pd.bdate_range("2012-01-02", periods=900))  # .. 2015-06-12
DAYS_2018 = tuple(d.strftime("%Y-%m-%d") for d in pd.bdate_range("2018-01-02", periods=750))
FIELDS = ("$open", "$high", "$low", "$close", "$volume", "$factor", "$change", "$vwap")


def only_all(**kw) -> DataProfile:
    return DataProfile(days=DAYS_2012, markets=("all",), sizes=(20,), fields=FIELDS, sample_codes=("AAPL",), **kw)


def cn() -> DataProfile:
    return DataProfile(days=DAYS_2018, markets=("all", "csi300", "csi100"), sizes=(30, 22, 7), fields=FIELDS,
                       sample_codes=("SH600000",) * 3)


def every_request(workload: Workload):
    yield "calendar", workload.hot_calendar
    yield "instrument", workload.hot_instruments
    yield "feature", workload.hot_features
    for n in range(0, workload.windows * workload.shifts, 997):
        yield "feature", workload.cold_features(n)
    yield from workload.mix_universe()


@pytest.mark.parametrize("profile", [only_all(), only_all(bounded=True), cn()], ids=["all", "all-cut", "cn"])
def test_every_request_asks_for_the_markets_and_dates_the_data_holds(profile):
    workload = Workload(profile)
    days = set(profile.days)
    for kind, body in every_request(workload):
        for key in ("start_time", "end_time"):
            if body.get(key) is not None:
                assert body[key] in days, (kind, body)
            else:
                assert not profile.bounded, (kind, body)  # a cut range names its ends
        if kind != "calendar":
            assert body["instruments"]["market"] in profile.markets
        for field in re.findall(r"\$\w+", " ".join(body.get("fields", []))):
            assert field in profile.fields


@pytest.mark.parametrize("profile", [only_all(), cn()], ids=["all", "cn"])
def test_the_mix_keeps_its_size_and_kinds_with_any_number_of_markets(profile):
    universe = Workload(profile).mix_universe()
    kinds = [kind for kind, _ in universe]
    assert (kinds.count("calendar"), kinds.count("instrument"), kinds.count("feature")) == (8, 20, 72)
    assert len({json.dumps(item, sort_keys=True) for item in universe}) == 100  # all distinct


def test_on_cn_data_the_hot_requests_keep_their_markets_and_range():
    workload = Workload(cn())
    assert workload.hot_instruments["instruments"]["market"] == "csi300"
    assert workload.hot_features["instruments"]["market"] == "csi100"
    assert workload.hot_features["fields"] == ["$close", "Mean($close, 5)"]
    assert (workload.start, workload.end) == ("2018-03-01", "2020-06-30")  # as before
    assert workload.windows * workload.shifts == 60_000


def test_cold_windows_fit_a_short_calendar_and_stay_new():
    profile = DataProfile(days=DAYS_2012[:60], markets=("all",), sizes=(5,), fields=FIELDS)
    workload = Workload(profile)
    fields = [tuple(workload.cold_features(n)["fields"]) for n in range(workload.windows * workload.shifts)]
    assert len(set(fields)) == len(fields)
    numbers = [int(x) for f in fields for x in re.findall(r"\d+", " ".join(f[1:]))]
    assert max(numbers) <= len(profile.days) // 3


def test_field_sets_use_only_the_given_fields_and_keep_their_number():
    sets = field_sets(("$close", "$volume"))
    assert len(sets) == 24 and len({tuple(s) for s in sets}) == 24
    assert {f for s in sets for e in s for f in re.findall(r"\$\w+", e)} <= {"$close", "$volume"}


def test_cut_calendar():
    assert cut_calendar(["2012-01-02 00:00:00", "2012-01-03", "2012-01-04"], "2012-01-03", None) == \
        ["2012-01-03", "2012-01-04"]
    assert cut_calendar(DAYS_2012, "2013-01-01", "2013-12-31")[0] == "2013-01-01"
    assert cut_calendar(DAYS_2012, "2020-01-01", None) == []


class FakeServer:
    """Answers like the server: the whole calendar, and an error for a market without an instrument file."""

    def __init__(self, markets: dict[str, list[str]]):
        self.markets = markets
        self.asked: list[str] = []

    def request(self, kind, body, timeout):
        if kind == "calendar":
            return {"status": 0, "result": [f"{d} 00:00:00" for d in DAYS_2012], "detailed_info": ""}
        market = body["instruments"]["market"]
        self.asked.append(market)
        assert body["start_time"] in DAYS_2012 and body["end_time"] in DAYS_2012
        if market not in self.markets:
            return {"status": 1, "result": None, "detailed_info": f"unknown market {market!r}"}
        return {"status": 0, "result": self.markets[market], "detailed_info": ""}


def test_discover_probes_the_candidate_markets_and_keeps_those_the_server_has():
    server = FakeServer({"all": ["AAPL", "MSFT", "IBM"], "sp500": ["MSFT", "AAPL"], "nasdaq100": []})
    profile = discover("http://unused", connection=server)
    assert server.asked == list(CANDIDATE_MARKETS)
    assert profile.markets == ("all", "sp500") and profile.sizes == (3, 2)  # an empty market is left out
    assert profile.sample_codes == ("AAPL", "AAPL")
    assert (profile.first, profile.last, profile.bounded) == ("2012-01-02", "2015-06-12", False)
    assert "markets all (3), sp500 (2); dates 2012-01-02 .. 2015-06-12" in profile.describe()


def test_discover_takes_given_markets_and_dates_and_refuses_what_the_server_lacks():
    server = FakeServer({"all": ["A"], "custom": ["B"]})
    profile = discover("http://unused", markets="custom", start="2013-01-01", end="2013-12-31",
                       fields="$close,$volume", connection=server)
    assert (profile.markets, profile.first, profile.last, profile.bounded) == \
        (("custom",), "2013-01-01", "2013-12-31", True)
    assert profile.fields == ("$close", "$volume")
    with pytest.raises(DataProfileError, match="market 'csi100': unknown market"):
        discover("http://unused", markets="all,csi100", connection=server)
    with pytest.raises(DataProfileError, match="no trading day"):
        discover("http://unused", start="2019-01-01", connection=server)
    with pytest.raises(DataProfileError, match="none of the markets"):
        discover("http://unused", connection=FakeServer({}))


