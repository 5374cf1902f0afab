"""The whole pipeline against a running server: answers equal local Qlib, bad requests are answered, metrics add up."""

from __future__ import annotations

import pickle
import queue
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest
import requests
from clients import WireClient, local_qlib
from conftest import wait_until
from qlib.data.cache import DiskDatasetCache
from qlib.data.filter import ExpressionDFilter, NameDFilter

pytestmark = pytest.mark.integration

START, END = "2019-01-02", "2019-06-28"
FIELDS = ["$close", "Mean($close, 5)", "$volume / Ref($volume, 1)"]
CODES = ["SZ000003", "SZ000001", "SH600002"]
ENCODINGS = ("json", "pickle", "dict")
# Seconds a request may wait: the first task of a test waits for the worker processes to load Qlib,
# which takes long on a busy machine (the server is ready before its workers are).
PATIENCE = 180
PIPES = {
    "none": [],
    "name": [NameDFilter(name_rule_re="^SH.*").to_config()],
    "expression": [ExpressionDFilter(rule_expression="$close>10").to_config()],
    "both": [NameDFilter(name_rule_re="^SZ.*").to_config(), ExpressionDFilter(rule_expression="$close>10").to_config()],
}
LOCAL_SCRIPT = f"""
import pandas as pd
START, END, FIELDS, CODES, PIPES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}, {PIPES!r}
result = {{
    "calendar_full": [str(t) for t in D.calendar()],
    "calendar_range": [str(t) for t in D.calendar(START, END)],
    "calendar_future": [str(t) for t in D.calendar(START, None, future=True)],
    "features_market": D.features({{"market": "csi300", "filter_pipe": []}}, FIELDS, START, END),
    "features_filtered": D.features({{"market": "csi300", "filter_pipe": PIPES["name"]}}, FIELDS, START, END),
    "features_codes": D.features(CODES, FIELDS, START, END),
    "features_missing_field": D.features(CODES, ["$close", "$nosuchfield"], START, END),
}}
for name, pipe in PIPES.items():
    market = {{"market": "csi300", "filter_pipe": pipe}}
    result["list_" + name] = D.list_instruments(market, START, END, as_list=True)
    spans = D.list_instruments(market, START, END, as_list=False)
    result["spans_" + name] = {{code: [[str(s), str(e)] for s, e in items] for code, items in spans.items()}}
"""


@pytest.fixture(scope="module")
def local(dataset) -> dict:
    """Every answer local Qlib gives on the test dataset, computed in one subprocess."""
    return local_qlib(LOCAL_SCRIPT, dataset)


@pytest.fixture
def uncached_server(start_server):
    """A server without the result cache, so that every request, in every encoding, runs through the pipeline."""
    return start_server(result_cache_ttl=0)


@pytest.fixture
def client(server):
    with WireClient(server.url) as c:
        yield c


def dated(body: dict, encoding: str) -> dict:
    """A pickled body carries its dates as pd.Timestamp, as a released pyqlib client's may."""
    if encoding != "pickle":
        return body
    return {k: pd.Timestamp(v) if k in ("start_time", "end_time") and v else v for k, v in body.items()}


def ask(client: WireClient, kind: str, body: dict, encoding: str = "json"):
    """Send one request that must succeed; return its result."""
    answer = client.request(kind, dated(body, encoding), encoding, timeout=PATIENCE)
    assert answer["status"] == 0, f"{kind} request failed: {answer['detailed_info']}"
    assert answer["detailed_info"] is None
    return answer["result"]


def read_cache(dataset: Path, uri: str, fields: list[str], start=START, end=END) -> pd.DataFrame:
    """Read a dataset cache file the way pyqlib's ClientDatasetProvider does."""
    assert isinstance(uri, str) and uri and "/" not in uri, uri
    return DiskDatasetCache.read_data_from_cache(dataset / "dataset_cache" / uri, start, end, fields)


def assert_same_frame(served: pd.DataFrame, local: pd.DataFrame, fields: list[str]) -> None:
    assert not local.empty
    assert sorted(served.columns) == sorted(local.columns) == sorted(fields)
    pdt.assert_frame_equal(served[fields].sort_index(), local[fields].sort_index(), check_freq=False)


def metric(server, name: str, **labels) -> float:
    return server.metric(f"qlib_server_{name}_total", **labels)


# --- answers equal local Qlib ---------------------------------------------------------------------


def test_calendars_and_instrument_lists_equal_local_qlib_in_every_encoding(uncached_server, local):
    with WireClient(uncached_server.url) as client:
        for encoding in ENCODINGS:
            full = ask(client, "calendar", {"start_time": None, "end_time": None, "freq": "day", "future": False},
                       encoding)
            assert full == local["calendar_full"] and len(full) == 750, encoding
            ranged = ask(client, "calendar", {"start_time": START, "end_time": END, "freq": "day", "future": False},
                         encoding)
            assert ranged == local["calendar_range"] and ranged[0].startswith(START), encoding
            future = ask(client, "calendar", {"start_time": START, "end_time": None, "freq": "day", "future": True},
                         encoding)
            assert future == local["calendar_future"], encoding

            for name, pipe in PIPES.items():
                body = {"instruments": {"market": "csi300", "filter_pipe": pipe}, "start_time": START,
                        "end_time": END, "freq": "day", "as_list": True}
                assert ask(client, "instrument", body, encoding) == local["list_" + name], (encoding, name)
                spans = ask(client, "instrument", {**body, "as_list": False}, encoding)
                assert spans == local["spans_" + name], (encoding, name)
    # every request, in every encoding, ran as a task
    assert metric(uncached_server, "tasks_published", type="calendar") == 3 * len(ENCODINGS)
    assert metric(uncached_server, "tasks_published", type="instrument") == 2 * len(PIPES) * len(ENCODINGS)
    # each filter really filters, so the comparison above means something
    assert local["list_name"] and set(local["list_name"]) < set(local["list_none"])
    assert local["list_both"] and set(local["list_both"]) < set(local["list_none"]) - set(local["list_name"])
    assert local["spans_expression"] != local["spans_none"]


def test_features_equal_local_qlib_in_every_encoding(uncached_server, local, dataset):
    cases = [("features_market", {"market": "csi300", "filter_pipe": []}, FIELDS),
             ("features_filtered", {"market": "CSI300", "filter_pipe": PIPES["name"]}, FIELDS),
             ("features_codes", CODES, FIELDS),
             ("features_missing_field", CODES, ["$close", "$nosuchfield"])]
    with WireClient(uncached_server.url) as client:
        for encoding in ENCODINGS:
            for name, instruments, fields in cases:
                body = {"instruments": instruments, "fields": fields, "start_time": START, "end_time": END,
                        "freq": "day", "disk_cache": 1}
                uri = ask(client, "feature", body, encoding)
                assert_same_frame(read_cache(dataset, uri, fields), local[name], fields)
            # disk_cache=0: nothing to read, the client computes from its own mount
            for instruments in ({"market": "csi300", "filter_pipe": PIPES["expression"]}, CODES):
                body = {"instruments": instruments, "fields": FIELDS, "start_time": START, "end_time": END,
                        "freq": "day", "disk_cache": 0}
                assert ask(client, "feature", body, encoding) == "", encoding
        assert metric(uncached_server, "tasks_published", type="feature") == (len(cases) + 2) * len(ENCODINGS)

        # fields whose values do not depend on where Qlib starts evaluating them: any dates get the same file,
        # which holds the whole history
        plain = [FIELDS[0], FIELDS[2]]
        body = {"instruments": CODES, "fields": plain, "start_time": "2018-03-01", "end_time": None, "disk_cache": 1}
        uri = ask(client, "feature", body, "pickle")
        assert ask(client, "feature", {**body, "start_time": START, "end_time": END}) == uri
        whole = read_cache(dataset, uri, plain, None, None)
        assert whole.index.get_level_values("datetime").min() == pd.Timestamp("2018-01-02")
        assert_same_frame(read_cache(dataset, uri, plain), local["features_codes"][plain], plain)
        # with Mean (a running sum: its rounding depends on where it starts) another start is another file, from
        # that start to the data's end (any end date reads it)
        windowed = ask(client, "feature", {**body, "fields": FIELDS, "start_time": START})
        assert ask(client, "feature", {**body, "fields": FIELDS, "start_time": START, "end_time": END}) == windowed
        assert windowed != ask(client, "feature", {**body, "fields": FIELDS, "start_time": "2018-03-01"})
        days = read_cache(dataset, windowed, FIELDS, None, None).index.get_level_values("datetime")
        assert (days.min(), days.max()) == (pd.Timestamp(START), whole.index.get_level_values("datetime").max())
    # a field the data does not have: qlib answers NaN, and so does the server's cache
    assert local["features_missing_field"]["$nosuchfield"].isna().all()


# --- bad requests are answered, and the server keeps serving --------------------------------------


def answer_of(client: WireClient, kind: str, body, encoding="json", **kw) -> dict:
    return client.request(kind, body, encoding, timeout=PATIENCE, **kw)


BAD_REQUESTS = [
    # (what, kind, body, encoding, extra send kwargs, expected status, words detailed_info must hold)
    ("malformed JSON body", "calendar", '{"start_time": "2019-01-01", ', "dict", {}, 1, "not valid JSON"),
    ("truncated pickle", "feature", pickle.dumps({"instruments": CODES, "fields": FIELDS})[:-7], "dict", {}, 1,
     "not a valid pickle"),
    ("body that is a number", "instrument", 42, "dict", {}, 1, "request body must be"),
    ("pickle calling os.system", "calendar", b"cos\nsystem\n(S'echo pwned'\ntR.", "dict", {}, 1, "os.system"),
    ("unknown market", "instrument", {"instruments": {"market": "nosuchmarket", "filter_pipe": []}, "as_list": True},
     "json", {}, 1, "unknown market 'nosuchmarket'"),
    ("unknown market for features", "feature", {"instruments": {"market": "nosuchmarket"}, "fields": ["$close"]},
     "pickle", {}, 1, "unknown market 'nosuchmarket'"),
    ("market outside the data directory", "instrument", {"instruments": {"market": "../etc"}}, "json", {}, 1,
     "not a valid name"),
    ("expression calling __import__", "feature", {"instruments": CODES, "fields": ['__import__("os")']}, "json", {},
     1, "'__import__' is not a Qlib operator"),
    ("filter expression calling __import__", "instrument", {"instruments": {"market": "csi300", "filter_pipe": [
        ExpressionDFilter(rule_expression='__import__("os").system("id")').to_config()]}}, "json", {}, 1,
     "'__import__' is not a Qlib operator"),
    ("client version below client_version", "calendar", {"freq": "day"}, "json", {"version": "0.1.0"}, 1,
     "client version 0.1.0 is not supported"),
    ("operator called with too few arguments", "feature", {"instruments": CODES, "fields": ["Div($close)"]}, "json",
     {}, 2, "Div"),
    ("operator failing on its arguments", "feature", {"instruments": CODES, "fields": ["Mean($close, -5)"],
                                                      "disk_cache": 1}, "json", {}, 2, "window"),
    ("frequency the data does not have", "calendar", {"freq": "1min"}, "json", {}, 2, "1min"),
    ("start after end", "feature", {"instruments": CODES, "fields": ["$close"], "start_time": "2020-01-01",
                                    "end_time": "2019-01-01"}, "json", {}, 1, "is after end_time"),
]


def test_bad_requests_are_answered_with_a_reason_and_the_server_keeps_serving(server, local, dataset):
    with WireClient(server.url) as client:
        for n, (what, kind, body, encoding, extra, status, words) in enumerate(BAD_REQUESTS):
            answer = answer_of(client, kind, body, encoding, **extra)
            assert answer["status"] == status, f"{what}: {answer}"
            assert answer["result"] is None, what
            assert isinstance(answer["detailed_info"], str) and words in answer["detailed_info"], f"{what}: {answer}"
            assert str(dataset) not in answer["detailed_info"], f"{what} reveals the data directory: {answer}"
            # a good request never asked before (so it runs a new task) is still answered right
            end = local["calendar_full"][100 + n][:10]
            good = ask(client, "calendar", {"start_time": None, "end_time": end})
            assert good == local["calendar_full"][:101 + n], what

        # an event the server does not know is answered on <name>_response
        answers: queue.Queue = queue.Queue()
        client.sio.on("drop_tables_response", answers.put)
        client.send("calendar", {"freq": "day"}, event="drop_tables_request")
        answer = answers.get(timeout=30)
        assert answer["status"] == 1 and answer["result"] is None
        assert "unknown event 'drop_tables_request'" in answer["detailed_info"]
        assert "calendar_request" in answer["detailed_info"]
        assert ask(client, "calendar", {"start_time": START, "end_time": END}) == local["calendar_range"]

    # a failing request on one connection does not disturb another one's
    with WireClient(server.url) as bad, WireClient(server.url) as good:
        bad.send("feature", {"instruments": CODES, "fields": ["Ref(Div($close), 1)"]})
        good.send("instrument", {"instruments": {"market": "csi300", "filter_pipe": PIPES["name"]},
                                 "start_time": START, "end_time": END, "as_list": True})
        assert bad.receive("feature", PATIENCE)["status"] == 2
        expected = {"result": local["list_name"], "status": 0, "detailed_info": None}
        assert good.receive("instrument", PATIENCE) == expected
    assert server.proc.poll() is None


# --- health and metrics ---------------------------------------------------------------------------


def test_health_and_metrics_add_up(server, client, local):
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    ready = requests.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True

    calendars = [{"start_time": START, "end_time": local["calendar_full"][i][:10]} for i in (300, 320, 340)]
    instruments = [{"instruments": {"market": m, "filter_pipe": []}, "as_list": True} for m in ("csi300", "csi100")]
    features = [{"instruments": CODES, "fields": ["$close"], "disk_cache": 0},
                {"instruments": CODES, "fields": ["$open"], "disk_cache": 0}]
    batches = {"calendar": calendars, "instrument": instruments, "feature": features}
    for kind, bodies in batches.items():
        for body in bodies:
            ask(client, kind, body)
    bad = answer_of(client, "feature", {"instruments": CODES, "fields": ["Div($close)"]})
    refused = answer_of(client, "calendar", {"freq": "fortnight"})
    assert (bad["status"], refused["status"]) == (2, 1)

    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert 'qlib_server_requests_total{type="calendar"}' in text
    print("metrics after the first round:", {k: v for k, v in server.metrics().items() if "_total" in k})
    for kind, bodies in batches.items():
        n = len(bodies)
        extra_calendar = kind == "calendar"  # the refused calendar request is counted, never published
        extra_feature = kind == "feature"  # the failing feature request is published and processed with status 2
        assert metric(server, "requests", type=kind) == n + 1 - (kind == "instrument"), kind
        assert metric(server, "tasks_published", type=kind) == n + extra_feature, kind
        assert metric(server, "tasks_processed", type=kind, status="0") == n, kind
        assert metric(server, "tasks_processed", type=kind, status="2") == extra_feature, kind
        wait_until(lambda kind=kind, n=n: metric(server, "responses", type=kind, status="0") == n, 10,
                   what=f"{kind} responses")
        assert metric(server, "responses", type=kind, status="1") == extra_calendar, kind

    # the same requests again are answered without new tasks
    for kind, bodies in batches.items():
        for body in bodies:
            ask(client, kind, body)
    for kind, bodies in batches.items():
        n = len(bodies)
        assert metric(server, "tasks_published", type=kind) == n + (kind == "feature"), kind
        assert metric(server, "cache_hits", type=kind) == n, kind
        assert metric(server, "requests", type=kind) == 2 * n + 1 - (kind == "instrument"), kind
        wait_until(lambda kind=kind, n=n: metric(server, "responses", type=kind, status="0") == 2 * n, 10,
                   what=f"{kind} responses")
    assert metric(server, "responses", type="feature", status="2") == 1
    assert metric(server, "tasks_dead_lettered", type="feature") == 0


# --- modules in separate processes ----------------------------------------------------------------


def test_handler_and_processor_in_separate_processes_serve_requests(start_server, local, dataset):
    processor = start_server(modules=("data_processor",), wait=False)
    handler = start_server(modules=("request_handler",))
    assert handler.config["task_queue"] == processor.config["task_queue"]
    assert handler.config["redis_task_db"] == processor.config["redis_task_db"]
    with WireClient(handler.url) as client:
        assert ask(client, "calendar", {"start_time": START, "end_time": END}, "pickle") == local["calendar_range"]
        codes = ask(client, "instrument", {"instruments": {"market": "csi300", "filter_pipe": PIPES["expression"]},
                                           "start_time": START, "end_time": END, "as_list": True})
        assert codes == local["list_expression"]
        uri = ask(client, "feature", {"instruments": CODES, "fields": FIELDS, "start_time": START, "end_time": END,
                                      "disk_cache": 1})
        assert_same_frame(read_cache(dataset, uri, FIELDS), local["features_codes"], FIELDS)
    assert processor.proc.poll() is None and handler.proc.poll() is None
    assert "data processor started" in processor.log()
    assert "data processor started" not in handler.log()
    assert metric(handler, "tasks_published", type="calendar") == 1
