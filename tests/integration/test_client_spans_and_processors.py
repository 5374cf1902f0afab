"""``qlib_server.client`` with a dict of instruments and spans (what ``D.list_instruments`` returns) and with
Qlib's ``inst_processors`` (Qlib's own ``TimeRangeFlt``, as a config or an instance, and a processor the
server lists in ``inst_processors_allowed``), against an embedded server on its defaults otherwise: the
frames equal local Qlib's (values, NaN positions, index levels and their dtypes, columns, dtypes), handlers
pass processors through, and a processor the server does not allow is refused naming the setting."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from clients import local_qlib, run_server_client
from conftest import ROOT, ServerProcess
from test_client import assert_same
from test_embedded import embedded_server

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
START, END = "2019-01-02", "2019-06-28"
FIELDS = ["$close", "Mean($close, 5)", "Ref($close, 1) / $close - 1", "Std($volume, 10)"]
CODES = ["SZ000003", "SZ000001", "SH600000", "SH600028"]

QUERIES = f"""
import pandas as pd
from qlib.data.dataset.processor import TimeRangeFlt
START, END, FIELDS, CODES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}
TIME_RANGE = {{"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
              "kwargs": {{"start_time": "2018-03-01", "end_time": "2020-10-30"}}}}
DEMEAN = {{"class": "Demean", "module_path": "qs_test_inst_processors", "kwargs": {{"fields": ["$close"]}}}}
spans = D.list_instruments(D.instruments("csi300"), "2019-03-01", "2019-09-30")
by_hand = {{"SH600000": [("2019-01-02", "2019-02-28"), ("2019-04-01", "2019-04-30")],
           "SZ000001": [(pd.Timestamp("2019-03-01"), pd.Timestamp("2019-06-28"))], "SZ000003": []}}
result = {{
    "spans": D.features(spans, FIELDS, START, END),
    "spans_in_another_window": D.features(spans, FIELDS, "2019-05-01", "2019-05-31", disk_cache=0),
    "spans_by_hand": D.features(by_hand, FIELDS, START, END),
    "time_range_config": D.features(D.instruments("all"), FIELDS, "2018-01-02", "2020-12-31",
                                    inst_processors=[TIME_RANGE]),
    "time_range_instance": D.features(D.instruments("all"), FIELDS, "2018-01-02", "2020-12-31",
                                      inst_processors=[TimeRangeFlt("2018-03-01", "2020-10-30")]),
    "demean": D.features(CODES, FIELDS, START, END, inst_processors=[DEMEAN]),
    "demean_later": D.features(CODES, FIELDS, "2019-03-01", END, inst_processors=[DEMEAN]),
    "demean_spans": D.features(spans, FIELDS, START, END, inst_processors=[DEMEAN, {{
        **TIME_RANGE, "kwargs": {{"start_time": "2019-03-05", "end_time": "2019-06-20"}}}}]),
    "filtered_out": D.features(CODES, FIELDS, "2019-03-01", END, inst_processors=[
        {{**TIME_RANGE, "kwargs": {{"start_time": "2019-01-02"}}}}]),
}}
"""
HANDLER = f"""
from qlib.contrib.data.handler import Alpha158
TIME_RANGE = {{"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
              "kwargs": {{"start_time": "2019-01-02", "end_time": "2019-06-28"}}}}
handler = Alpha158(instruments="csi300", start_time={START!r}, end_time={END!r}, fit_start_time={START!r},
                   fit_end_time={END!r}, inst_processors=[TIME_RANGE])
result = {{"alpha158": handler.fetch(col_set="feature"), "alpha158_label": handler.fetch(col_set="label")}}
"""
REFUSED = """
result = {}
PROCESSORS = {"not allowed": {"class": "Rescale", "module_path": "qs_test_inst_processors"},
              "not importable": {"class": "system", "module_path": "os", "kwargs": {"command": "id"}}}
for name, processor in PROCESSORS.items():
    try:
        D.features(["SH600000"], ["$close"], "2019-01-02", "2019-02-01", inst_processors=[processor])
        result[name] = None
    except Exception as exc:
        result[name] = f"{type(exc).__name__}: {exc}"
"""


@pytest.fixture(scope="module")
def importable() -> Iterator[None]:
    """``qs_test_inst_processors`` (and this checkout's ``qlib_server``) importable by every process these
    tests start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        yield


@pytest.fixture(scope="module")
def allowing_server(tmp_path_factory, dataset, importable) -> Iterator[ServerProcess]:
    """An embedded server on its defaults, but for the one processor of the tests it allows."""
    with embedded_server(tmp_path_factory.mktemp("processors"), dataset,
                         inst_processors_allowed=["qs_test_inst_processors.Demean"]) as server:
        yield server


@pytest.fixture
def empty(tmp_path) -> Path:
    directory = tmp_path / "no-data"
    directory.mkdir()
    return directory


def test_spans_and_inst_processors_through_qlib_server_client_equal_local_qlib(allowing_server, dataset, empty):
    expected = local_qlib(QUERIES, dataset)
    served = run_server_client(QUERIES, allowing_server.port, empty)
    assert_same(served, expected)
    assert list(empty.iterdir()) == []
    # what the comparison rests on: each query is one where the spans or the processors change the answer
    for name in ("spans", "spans_by_hand", "time_range_config", "demean", "demean_spans"):
        assert len(expected[name]) > 100, name
    assert expected["time_range_config"].equals(expected["time_range_instance"])
    listed = {"all": 30, "spans": len(expected["spans"].index.get_level_values("instrument").unique())}
    kept = expected["time_range_config"].index.get_level_values("instrument").nunique()
    assert kept < listed["all"]  # TimeRangeFlt dropped the instruments listed late or delisted early
    hand = expected["spans_by_hand"].reset_index()
    assert set(hand["instrument"]) == {"SH600000", "SZ000001"}  # SZ000003's spans are empty
    assert hand[hand["instrument"] == "SH600000"]["datetime"].dt.month.isin([1, 2, 4]).all()
    overlap = expected["demean_later"].index
    assert np.abs(expected["demean"].loc[overlap, "$close"] - expected["demean_later"]["$close"]).min() > 0
    assert expected["filtered_out"].empty


def test_a_handler_given_inst_processors_equals_local_qlib(allowing_server, dataset, empty):
    expected = local_qlib(HANDLER, dataset)
    assert expected["alpha158"].shape[1] == 158 and len(expected["alpha158"]) > 1000
    assert_same(run_server_client(HANDLER, allowing_server.port, empty), expected)


def test_an_inst_processor_the_server_does_not_allow_is_refused_naming_the_setting(allowing_server, empty):
    refused = run_server_client(REFUSED, allowing_server.port, empty)
    for name in ("not allowed", "not importable"):
        assert refused[name].startswith("ValueError: Bad response(status==1)"), refused[name]
        assert "may not run on this server" in refused[name] and "inst_processors_allowed" in refused[name]
    assert "'qs_test_inst_processors.Rescale'" in refused["not allowed"]
    assert "'os.system'" in refused["not importable"]
