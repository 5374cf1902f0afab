"""Real pyqlib 0.9.7 clients against the server get what local Qlib gives on the same data.

Each script runs several queries in one subprocess: a real client request costs about a second.
"""

from __future__ import annotations

import json

import pandas as pd
import pandas.testing as pdt
import pytest
from clients import local_qlib, run_pyqlib

pytestmark = pytest.mark.integration

START, END = "2019-01-02", "2019-06-28"
# Seconds one client script may take: its first request waits for the server's workers to load Qlib.
PATIENCE = 280
FIELDS = ["$close", "Mean($close, 5)", "$volume / Ref($volume, 1)"]
CODES = ["SZ000003", "SZ000001", "SH600002"]

# The queries, written once for local Qlib and for the client (whose D goes to the server). The
# calendar goes through ClientCalendarProvider directly: the client prelude keeps D.calendar local.
QUERIES = f"""
import pandas as pd
from qlib.data.filter import ExpressionDFilter, NameDFilter
START, END, FIELDS, CODES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}
PIPE = [NameDFilter(name_rule_re="^SZ.*"), ExpressionDFilter(rule_expression="$close>10")]

def spans_as_text(spans):
    return {{code: [[str(s), str(e)] for s, e in items] for code, items in spans.items()}}

result = {{
    "list": D.list_instruments(D.instruments("csi300"), START, END, as_list=True),
    "spans": spans_as_text(D.list_instruments(D.instruments("csi300"), START, END)),
    "filtered": spans_as_text(D.list_instruments(D.instruments("csi300", filter_pipe=PIPE), START, END)),
    "features_market_0": D.features(D.instruments("csi300"), FIELDS, START, END, disk_cache=0),
    "features_codes_1": D.features(CODES, FIELDS, START, END, disk_cache=1),
    "features_filtered_1": D.features(D.instruments("csi100", filter_pipe=PIPE[:1]), FIELDS, pd.Timestamp(START),
                                      None, disk_cache=1),
}}
"""
CALENDAR_QUERIES = """
from qlib.data.client import Client
from qlib.data.data import ClientCalendarProvider
calendar = ClientCalendarProvider()
calendar.set_conn(Client("127.0.0.1", {port}))
result["calendar_range"] = [str(t) for t in calendar.calendar(START, END)]
result["calendar_full"] = [str(t) for t in calendar.calendar()]
try:
    D.features(CODES, ['__import__("os").getcwd()'], START, END, disk_cache=1)
    result["refused"] = None
except Exception as exc:  # the client raises ValueError("Bad response(status==1), detailed info: ...")
    result["refused"] = f"{{type(exc).__name__}}: {{exc}}"
"""
LOCAL_CALENDAR = """
result["calendar_range"] = [str(t) for t in D.calendar(START, END)]
result["calendar_full"] = [str(t) for t in D.calendar()]
"""
# Qlib's main branch sends the body as JSON text: make the released client do the same.
JSON_BODIES = """
import json, types
import qlib.data.client
SENT = []

def json_dumps(obj, protocol=None):
    SENT.append(json.dumps(obj, default=str))
    return SENT[-1]

qlib.data.client.pickle = types.SimpleNamespace(dumps=json_dumps)
"""
JSON_SENT = """
result["sent"] = SENT
"""


@pytest.fixture(scope="module")
def local(dataset) -> dict:
    return local_qlib(QUERIES + LOCAL_CALENDAR, dataset)


def assert_same_answers(served: dict, local: dict) -> None:
    assert served["list"] == local["list"] and len(local["list"]) > 5
    assert served["spans"] == local["spans"]
    assert served["filtered"] == local["filtered"] and local["filtered"] != local["spans"]
    assert served["calendar_range"] == local["calendar_range"] and served["calendar_range"][0].startswith(START)
    assert served["calendar_full"] == local["calendar_full"] and len(local["calendar_full"]) == 750
    for name in ("features_market_0", "features_codes_1", "features_filtered_1"):
        assert not local[name].empty, name
        assert list(served[name].columns) == list(local[name].columns) == FIELDS, name
        pdt.assert_frame_equal(served[name].sort_index(), local[name].sort_index(), check_freq=False, obj=name)
    assert served["refused"].startswith("ValueError: Bad response(status==1)")
    assert "'__import__' is not a Qlib operator" in served["refused"]


def test_released_pyqlib_client_gets_local_answers(server, local, dataset):
    script = QUERIES + CALENDAR_QUERIES.format(port=server.port)
    served = run_pyqlib(script, server.port, dataset, timeout=PATIENCE)
    assert_same_answers(served, local)
    # every request arrived as a pickle and went through the pipeline
    assert server.metric("qlib_server_requests_total", type="calendar") == 2
    assert server.metric("qlib_server_tasks_published_total", type="feature") == 3
    assert server.metric("qlib_server_responses_total", type="feature", status="1") == 1


def test_json_body_pyqlib_client_gets_local_answers(server, local, dataset):
    script = JSON_BODIES + QUERIES + CALENDAR_QUERIES.format(port=server.port) + JSON_SENT
    served = run_pyqlib(script, server.port, dataset, timeout=PATIENCE)
    assert_same_answers(served, local)
    bodies = [json.loads(text) for text in served["sent"]]  # the client really sent JSON text
    received = sum(server.metric("qlib_server_requests_total", type=kind) for kind in ("calendar", "instrument",
                                                                                      "feature"))
    assert len(bodies) == received
    assert {"start_time": "2019-01-02 00:00:00", "end_time": None} in [
        {k: b.get(k) for k in ("start_time", "end_time")} for b in bodies]
    assert server.metric("qlib_server_tasks_published_total", type="feature") == 3


def test_local_answers_are_real_data(local):
    """Guard: the comparison above would be empty if the local side returned nothing."""
    frame = local["features_codes_1"]
    assert isinstance(frame, pd.DataFrame) and frame.index.names == ["instrument", "datetime"]
    assert set(frame.index.get_level_values("instrument")) == set(CODES)
    assert frame["$close"].notna().mean() > 0.9
