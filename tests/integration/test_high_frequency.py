"""1-minute data end to end: ``qlib_server.client`` and the stock pyqlib 0.9.7 client against a server on
minute bars (``calendars/1min.txt``, ``features/<code>/<field>.1min.bin``, spans as minute timestamps) get
what local Qlib gives on the same data: calendars, instrument lists and spans, and feature frames
(``df.equals``, index levels and their dtypes, columns and dtypes) of raw fields, ``Ref``, ``Mean`` and
Alpha158-style fields, over markets, codes and a dict of instruments and spans.

Local Qlib evaluates an expression from the window's start; pandas' rolling variance (Std, Var, Skew, Kurt)
then rounds a few values otherwise than from the history's start: on these minute bars, where a bar moves
little against the price, a handful in ten thousand by an ulp. The server computes such a field from the
window's start too (a cache of that start: :mod:`qlib_server.dataset_keys`), so a window of Std from
mid-calendar is local Qlib's, not the whole history's cut to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from clients import local_qlib, run_pyqlib, run_server_client
from conftest import ServerProcess
from test_client import assert_same, assert_same_frame
from test_embedded import embedded_server

from qlib_server.datagen import MINUTE_BARS, generate_minute_dataset

pytestmark = pytest.mark.integration

DAYS = 15
START, END = "2020-03-04 10:00:00", "2020-03-17 14:30:00"  # mid-morning to mid-afternoon: partial days
FIELDS = ["$close", "Ref($close, 1)", "Mean($close, 30)",
          # Alpha158-style (KMID, KSFT, CORR, RSQR, MAX, BETA, RSV, a label) on minute bars
          "($close-$open)/$open", "(2*$close-$high-$low)/$open", "Corr($close, Log($volume+1), 10)",
          "Rsquare($close, 10)", "(Max($high, 5)-$close)/$close", "Slope($close, 10)/$close",
          "($close-Min($low, 30))/(Max($high, 30)-Min($low, 30)+1e-12)", "Ref($close, -2)/Ref($close, -1) - 1"]
STD = ["Std($close, 20)/$close", "Std($volume, 60)/($volume+1e-12)"]  # Alpha158's STD20, VSTD60
CODES = ["SZ000001", "SH600000", "SZ000007"]  # always listed, listed late, delisted early

# D.calendar, D.list_instruments and D.features of minute bars, for local Qlib and qlib_server.client
QUERIES = f"""
START, END, FIELDS, CODES, STD = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}, {STD!r}
csi300 = D.instruments("csi300")
spans = D.list_instruments(csi300, START, END, freq="1min")
result = {{
    "calendar": D.calendar(freq="1min"),
    "calendar_range": D.calendar(START, END, freq="1min"),
    "list": D.list_instruments(csi300, START, END, freq="1min", as_list=True),
    "spans": spans,
    "spans_all": D.list_instruments(D.instruments("all"), freq="1min"),
    "features_market": D.features(csi300, FIELDS, START, END, freq="1min"),
    "features_history": D.features(csi300, FIELDS + STD, None, END, freq="1min"),
    "features_codes": D.features(CODES, FIELDS[:3] + STD, freq="1min"),
    "features_spans": D.features(spans, FIELDS[:6], START, END, freq="1min"),
    "features_one_day": D.features(D.instruments("all"), ["$close", "$volume"], "2020-03-10", "2020-03-10 23:59:59",
                                   freq="1min"),
    "std_window": D.features(csi300, STD, START, END, freq="1min"),
}}
"""
# local Qlib's values of the whole history, in the window (what a cache of the whole history would hold)
LOCAL_STD = """
window = result["std_window"]
result["std_window_of_history"] = D.features(csi300, STD, None, END, freq="1min").loc[window.index]
"""
# The same through the stock client: its D.calendar reads the mount, so the calendars are asked of the
# server through ClientCalendarProvider; features come from the dataset cache on the mount (disk_cache=1),
# or are computed by the client from the mount once the server has been asked (disk_cache=0).
STOCK_QUERIES = QUERIES.replace('D.calendar(freq="1min")', 'calendar.calendar(freq="1min")').replace(
    'D.calendar(START, END, freq="1min")', 'calendar.calendar(START, END, freq="1min")') + \
    'result["features_market_0"] = D.features(csi300, FIELDS, START, END, freq="1min", disk_cache=0)\n'
STOCK_PRELUDE = """
from qlib.data.client import Client
from qlib.data.data import ClientCalendarProvider
calendar = ClientCalendarProvider()
calendar.set_conn(Client("127.0.0.1", {port}))
"""


@pytest.fixture(scope="module")
def minute_data(tmp_path_factory) -> Path:
    return generate_minute_dataset(tmp_path_factory.mktemp("minute") / "data", instruments=8, days=DAYS)


@pytest.fixture(scope="module")
def minute_server(tmp_path_factory, minute_data) -> Iterator[ServerProcess]:
    with embedded_server(tmp_path_factory.mktemp("minute-server"), minute_data) as server:
        yield server


@pytest.fixture(scope="module")
def local(minute_data) -> dict:
    return local_qlib(QUERIES + LOCAL_STD, minute_data)


def without(answers: dict, *names: str) -> dict:
    return {name: value for name, value in answers.items() if name not in names}


def test_the_minute_dataset_is_qlibs_high_frequency_layout(minute_data, local):
    lines = (minute_data / "calendars" / "1min.txt").read_text().split("\n")
    assert lines[:2] == ["2020-03-02 09:31:00", "2020-03-02 09:32:00"] and len(lines) - 1 == DAYS * 240
    assert len(MINUTE_BARS) == 240 and lines[119:121] == ["2020-03-02 11:30:00", "2020-03-02 13:01:00"]
    assert (minute_data / "features" / "sz000001" / "close.1min.bin").is_file()
    assert not (minute_data / "calendars" / "day.txt").exists()
    # what the comparisons below rest on: partial days, late listings and delistings, re-entries, NaN bars
    assert len(local["calendar"]) == DAYS * 240 and str(local["calendar_range"][0]) == START
    assert any(len(items) > 1 for items in local["spans"].values())
    frame = local["features_market"]
    assert len(frame) > 5000 and frame["$close"].isna().any() and frame["$close"].notna().mean() > 0.8
    assert set(local["features_codes"].index.get_level_values("instrument")) == set(CODES)
    firsts = local["features_codes"].reset_index().groupby("instrument")["datetime"].min()
    assert firsts["SH600000"] > firsts["SZ000001"]
    assert local["features_spans"].index.get_level_values("instrument").nunique() == len(local["spans"])


def test_qlib_server_client_gets_what_local_qlib_gives_on_minute_bars(minute_server, local, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    served = run_server_client(QUERIES, minute_server.port, empty)
    assert_same(served, without(local, "std_window_of_history"))
    assert list(empty.iterdir()) == []


def test_a_rolling_std_from_mid_calendar_rounds_otherwise_than_the_whole_historys_in_local_qlib(local):
    """What the comparisons of ``std_window`` rest on: local Qlib's values over the window and over the whole
    history differ, in a handful of values and by one ulp (a cache of the whole history cut to the window
    would not be local Qlib's frame)."""
    window, history = local["std_window"], local["std_window_of_history"]
    assert window.index.equals(history.index) and len(window) > 5000
    a, b = window.to_numpy(), history.to_numpy()
    off = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    assert 0 < off.sum() < a.size / 1000
    assert np.abs(a[off].view(np.int32).astype(np.int64) - b[off].view(np.int32)).max() == 1


def test_the_stock_pyqlib_client_gets_what_local_qlib_gives_on_minute_bars(minute_server, local, minute_data):
    served = run_pyqlib(STOCK_PRELUDE.format(port=minute_server.port) + STOCK_QUERIES, minute_server.port,
                        minute_data)
    assert served.keys() == local.keys() - {"std_window_of_history"} | {"features_market_0"}
    for name in ("calendar", "calendar_range"):  # the stock client's calendar provider gives a list
        assert [str(t) for t in served[name]] == [str(t) for t in local[name]], name
    for name in ("list", "spans", "spans_all"):
        assert served[name] == local[name], name
    for name in ("features_market", "features_history", "features_codes", "features_spans", "features_one_day"):
        assert_same_frame(served[name], local[name], name)
    assert_same_frame(served["std_window"], local["std_window"], "std_window")
    assert_same_frame(served["features_market_0"], local["features_market"], "features_market_0")
    assert isinstance(local["calendar"][0], pd.Timestamp)
