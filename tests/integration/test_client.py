"""``qlib_server.client``: Qlib with no shared mount gets what local Qlib gives (the same frames, index
level dtypes included), over one connection that rides out a server restart, never waits past its
timeout, and is refused at once without admission.

The client's ``provider_uri`` is an empty directory (or unset): everything comes from the server.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time

import pandas as pd
import pandas.testing as pdt
import pytest
from clients import WireClient, local_qlib, run_server_client
from conftest import free_port, wait_until
from faults import slow_terms
from test_embedded import embedded_server

pytestmark = pytest.mark.integration

START, END = "2019-01-02", "2019-06-28"
FIELDS = ["$close", "Mean($close, 5)", "Ref($close, 1) / $close - 1", "$close"]
CODES = ["SZ000003", "SZ000001", "SH600002"]

QUERIES = f"""
import pandas as pd
from qlib.data.filter import ExpressionDFilter, NameDFilter
START, END, FIELDS, CODES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}
NAME, RULE = NameDFilter(name_rule_re="^SZ.*"), ExpressionDFilter(rule_expression="$close>10")
csi300 = D.instruments("csi300")
result = {{
    "calendar_full": D.calendar(),
    "calendar_range": D.calendar(START, END),
    "calendar_future": D.calendar(START, None, future=True),
    "calendar_none": D.calendar("2030-01-01", "2030-02-01"),
    "list": D.list_instruments(csi300, START, END, as_list=True),
    "spans": D.list_instruments(csi300, START, END),
    "spans_all_time": D.list_instruments(D.instruments("all")),
    "name_filter": D.list_instruments(D.instruments("csi300", filter_pipe=[NAME]), START, END),
    "expression_filter": D.list_instruments(D.instruments("csi300", filter_pipe=[NAME, RULE]), START, END,
                                            as_list=True),
    "features_codes_1": D.features(CODES, FIELDS, START, END, disk_cache=1),
    "features_codes_0": D.features(CODES, FIELDS, START, END, disk_cache=0),
    "features_market": D.features(csi300, FIELDS, START, END),
    "features_market_all_time": D.features(D.instruments("all"), ["$open", "$volume"]),
    "features_from": D.features(D.instruments("csi100", filter_pipe=[NAME]), FIELDS[:2], pd.Timestamp(START), None),
    "features_until": D.features(CODES[:1], ["Std($close, 20)"], None, END, disk_cache=0),
    "features_filtered": D.features(D.instruments("csi300", filter_pipe=[RULE]), ["$close"], START, END),
    "features_no_dates": D.features(CODES, FIELDS, "2030-01-01", "2030-06-01"),
    "features_no_rows": D.features(["SH699999"], ["$close"], START, END),
}}
"""
ALPHA158 = f"""
from qlib.contrib.data.handler import Alpha158
handler = Alpha158(instruments="csi300", start_time={START!r}, end_time={END!r}, fit_start_time={START!r},
                   fit_end_time={END!r})
result = {{"alpha158": handler.fetch(col_set="feature"), "alpha158_label": handler.fetch(col_set="label")}}
"""


def assert_same_frame(got: pd.DataFrame, expected: pd.DataFrame, name: str = "frame") -> None:
    """The same frame: values, index levels with their dtypes and order, columns and their dtype, dtypes
    (``df.equals`` alone overlooks a datetime level's resolution on pandas 3)."""
    assert got.equals(expected), name
    pdt.assert_frame_equal(got, expected, obj=name)
    assert list(got.index.names) == list(expected.index.names), name
    assert [lv.dtype for lv in got.index.levels] == [lv.dtype for lv in expected.index.levels], name
    assert got.columns.dtype == expected.columns.dtype and list(got.dtypes) == list(expected.dtypes), name


def assert_same(served: dict, local: dict) -> None:
    assert served.keys() == local.keys()
    for name, expected in local.items():
        got = served[name]
        if isinstance(expected, pd.DataFrame):
            assert_same_frame(got, expected, name)
        elif hasattr(expected, "dtype"):  # a calendar: an array of Timestamps, of the same resolution
            assert list(got) == list(expected) and got.dtype == expected.dtype, name
            assert [getattr(t, "unit", None) for t in got] == [getattr(t, "unit", None) for t in expected], name
        else:
            assert got == expected, name


@pytest.fixture(scope="module")
def local(dataset) -> dict:
    return local_qlib(QUERIES, dataset)


def test_client_with_an_empty_provider_uri_gets_what_local_qlib_gives(server, local, dataset, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    served = run_server_client(QUERIES, server.port, empty)
    assert_same(served, local)
    assert list(empty.iterdir()) == []  # nothing read from nor written to the client's data directory
    assert len(local["calendar_full"]) == 750 and len(local["list"]) > 5 and local["name_filter"] != local["spans"]
    assert local["expression_filter"] and len(local["expression_filter"]) < len(local["list"])
    for name in ("features_codes_1", "features_market", "features_from", "features_filtered"):
        assert len(local[name]) > 50, name
    assert local["features_no_dates"].empty and local["features_no_rows"].empty


def test_second_run_is_served_from_the_dataset_cache_with_the_same_answers(server, local, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    run_server_client(QUERIES, server.port, empty)
    published = server.metric("qlib_server_tasks_published_total", type="feature")
    assert_same(run_server_client(QUERIES, server.port, None), local)  # provider_uri left unset
    assert_same(run_server_client(QUERIES, server.port, None, delivery="stream"), local)  # the rows streamed
    assert server.metric("qlib_server_tasks_published_total", type="feature") == published  # nothing computed again


def test_alpha158_over_a_market_equals_local_qlib(server, dataset, tmp_path):
    expected = local_qlib(ALPHA158, dataset)
    assert expected["alpha158"].shape[1] == 158 and len(expected["alpha158"]) > 1000
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert_same(run_server_client(ALPHA158, server.port, empty), expected)  # the cache's files mapped
    assert_same(run_server_client(ALPHA158, server.port, empty, delivery="stream"), expected)


ALPHA360 = f"""
from qlib.contrib.data.loader import Alpha360DL
fields = Alpha360DL.get_feature_config()[0] + ["Ref($close, -2)/Ref($close, -1) - 1"]  # and Alpha360's label
result = {{"fields": len(fields), "alpha360": D.features({CODES!r}, fields, {START!r}, {END!r})}}
"""


def test_alpha360_with_its_label_is_served_on_the_default_limits_and_equals_local_qlib(dataset, tmp_path):
    expected = local_qlib(ALPHA360, dataset)
    assert expected["fields"] == 361 and expected["alpha360"].shape[1] == 361 and len(expected["alpha360"]) > 300
    empty = tmp_path / "no-data"
    empty.mkdir()
    with embedded_server(tmp_path / "embedded", dataset) as server:  # every limit on its default
        served = run_server_client(ALPHA360, server.port, empty)
    assert_same(served, expected)
    print(f"\nAlpha360 + label: {served['alpha360'].shape}, datetime level "
          f"{served['alpha360'].index.levels[1].dtype} (pandas {pd.__version__}), equal to local Qlib's")


def test_client_against_the_embedded_server_gets_what_local_qlib_gives(local, dataset, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    with embedded_server(tmp_path / "embedded", dataset) as server:
        assert_same(run_server_client(QUERIES, server.port, empty), local)


# -- one connection, in this process ----------------------------------------------------------------
@pytest.fixture
def qlib_client(tmp_path):
    """Factory: ``qlib.init`` this process with the server client; the connections are closed after."""
    import qlib

    from qlib_server.client import connection

    def init(port: int, **options):
        empty = tmp_path / "no-data"
        empty.mkdir(exist_ok=True)
        qlib.init(**connection_config(port, **options), provider_uri=str(empty), region="cn", logging_level="ERROR")

    def connection_config(port, **options):
        from qlib_server.client import client_config

        return client_config("127.0.0.1", port, **options)

    yield init
    for conn in list(connection._connections.values()):
        conn.close()
    connection._connections.clear()


def test_concurrent_requests_share_one_connection_and_each_gets_its_answer(server, qlib_client, dataset):
    from qlib.data import D

    qlib_client(server.port)
    expected = local_qlib("result = [D.list_instruments(D.instruments('csi300'), f'2018-0{m}-01', f'2019-0{m}-28') "
                          "for m in range(1, 9)]", dataset)
    answers: dict[int, dict] = {}

    def ask(m: int) -> None:
        answers[m] = D.list_instruments(D.instruments("csi300"), f"2018-0{m}-01", f"2019-0{m}-28")

    threads = [threading.Thread(target=ask, args=(m,)) for m in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers[m] for m in range(1, 9)] == expected and len({str(a) for a in expected}) == 8
    assert server.metric("qlib_server_connected_clients") == 1


class Mappings(list):
    """The files this process's client mapped; :meth:`fail` makes the next mapping raise as the OS would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[OSError] = []

    def fail(self, error: OSError) -> None:
        self.failures.append(error)


@pytest.fixture
def mappings(monkeypatch) -> Mappings:
    from qlib_server.client import placed

    mapped, real = Mappings(), placed._mapped

    def mapping(path, identity):
        if mapped.failures:
            raise mapped.failures.pop(0)
        mapped.append(path)
        return real(path, identity)

    monkeypatch.setattr(placed, "_mapped", mapping)
    return mapped


def test_a_client_on_the_servers_host_maps_the_cache_files_and_gets_local_qlibs_frame(server, qlib_client, local,
                                                                                      mappings):
    from qlib.data import D

    qlib_client(server.port)
    assert_same_frame(D.features(D.instruments("csi300"), FIELDS, START, END), local["features_market"])
    assert len(mappings) == 1 and ".records." in mappings[0]
    assert_same_frame(D.features(CODES, FIELDS, START, END, disk_cache=1), local["features_codes_1"])
    assert len(mappings) == 2


def test_a_client_that_cannot_map_the_files_streams_the_rows_and_stops_asking_for_files(server, qlib_client, local,
                                                                                         mappings):
    from qlib.data import D

    from qlib_server.client import connection

    qlib_client(server.port)
    mappings.fail(PermissionError(13, "Permission denied"))  # e.g. a cache directory of another user's
    assert_same_frame(D.features(D.instruments("csi300"), FIELDS, START, END), local["features_market"])
    assert_same_frame(D.features(CODES, FIELDS, START, END, disk_cache=1), local["features_codes_1"])
    assert mappings == [] and [c.maps_files for c in connection._connections.values()] == [False]


def test_a_cache_replaced_before_the_client_maps_it_is_streamed_that_once(server, qlib_client, local, mappings,
                                                                         tmp_path):
    from qlib.data import D

    from qlib_server.client import connection

    qlib_client(server.port)
    mappings.fail(FileNotFoundError(2, "No such file or directory", str(tmp_path / "abc.records.0123456789ab")))
    assert_same_frame(D.features(D.instruments("csi300"), FIELDS, START, END), local["features_market"])
    assert mappings == [] and [c.maps_files for c in connection._connections.values()] == [True]
    assert_same_frame(D.features(CODES, FIELDS, START, END, disk_cache=1), local["features_codes_1"])
    assert len(mappings) == 1


def test_a_server_restart_during_a_session_is_survived(start_server, qlib_client):
    from qlib.data import D

    first = start_server()
    qlib_client(first.port)
    before = D.features(["SH600002"], ["$close"], START, END)
    first.stop()
    second = start_server(flask_port=first.port)
    after = D.features(["SH600002", "SZ000001"], ["$close"], START, END)  # a new request: computed anew
    pdt.assert_frame_equal(after.loc[["SH600002"]], before)
    assert D.list_instruments(D.instruments("csi300"), START, END, as_list=True)
    assert second.metric("qlib_server_connected_clients") == 1


def test_a_request_nobody_answers_times_out_with_a_clear_error(start_server, qlib_client):
    from qlib.data import D

    from qlib_server.client import RequestTimeout

    server = start_server(modules=("request_handler",))  # no processor: no task is ever computed
    qlib_client(server.port, timeout=2)
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match="no answer from qlib-server .* within 2s"):
        D.features(["SH600002"], ["$close"], START, END)
    assert time.monotonic() - started < 10
    with pytest.raises(RequestTimeout):
        D.list_instruments(D.instruments("csi300"), as_list=True)


def test_refused_admission_is_raised_at_once_and_the_token_admits(start_server, qlib_client):
    from qlib.data import D

    from qlib_server.client import AdmissionRefused, ServerConnection

    server = start_server(allowed_networks=["10.0.0.0/8"], auth_token="s3cret")
    for token in (None, "wrong"):  # not in allowed_networks, and no token or a wrong one
        qlib_client(server.port, timeout=60, auth_token=token)
        started = time.monotonic()
        with pytest.raises(AdmissionRefused, match="refused this client"):
            D.calendar()
        assert time.monotonic() - started < 5  # at once: a refusal is not retried until the timeout
    body = {"instruments": ["SH600002"], "fields": ["$close"], "start_time": START, "end_time": END, "freq": "day",
            "disk_cache": 1}
    started = time.monotonic()
    with pytest.raises(AdmissionRefused):  # the feature transfer endpoint is guarded the same way
        ServerConnection("127.0.0.1", server.port, timeout=60).features(body, ["$close"])
    assert time.monotonic() - started < 5
    assert server.metric("qlib_server_refused_connections_total") >= 3
    qlib_client(server.port, auth_token="s3cret")
    frame = D.features(["SH600002"], ["$close"], START, END)
    assert len(frame) > 50 and frame.index.names == ["instrument", "datetime"]


def test_a_server_error_raises_what_the_stock_client_raises(server, qlib_client):
    from qlib.data import D

    qlib_client(server.port)
    with pytest.raises(ValueError, match=r"Bad response\(status==1\).*'__import__' is not a Qlib operator"):
        D.features(["SH600002"], ['__import__("os").getcwd()'], START, END)
    with pytest.raises(ValueError, match=r"Bad response\(status==1\)"):
        D.list_instruments(D.instruments("no/such"), as_list=True)


# -- a server that restarts, or is not there --------------------------------------------------------
class Asker:
    """Asks an instrument list every ``every`` seconds in a thread; records each request's outcome."""

    def __init__(self, every: float = 0.2):
        from qlib.data import D

        self.every, self.D = every, D
        self.outcomes: list[tuple[float, float, object]] = []  # (sent, seconds, list or exception)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.halt.is_set():
            sent = time.monotonic()
            try:
                outcome: object = self.D.list_instruments(self.D.instruments("csi300"), START, END, as_list=True)
            except Exception as exc:  # noqa: BLE001 -- every failure is what the test counts
                outcome = exc
            self.outcomes.append((sent, time.monotonic() - sent, outcome))
            self.halt.wait(self.every)

    def answered_since(self, moment: float) -> int:
        return sum(1 for sent, _, outcome in self.outcomes if sent >= moment and isinstance(outcome, list))

    def __enter__(self) -> Asker:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop asking (the request in hand is finished first)."""
        self.halt.set()
        self.thread.join(120)

    def __exit__(self, *exc) -> None:
        self.stop()


def slow_feature() -> dict:
    """A feature request no other asks for, that keeps a worker busy about 4 s (12 :func:`faults.slow_terms`)."""
    return {"instruments": ["SH600002"], "fields": slow_terms(12, random.randrange(10**6)), "start_time": None,
            "end_time": None, "freq": "day", "disk_cache": 1}


def test_a_client_asking_every_200_ms_rides_out_a_sigterm_and_a_restart_with_no_failed_request(
        dataset, tmp_path, qlib_client, caplog):
    caplog.set_level(logging.INFO, logger="qlib_server.client.connection")
    port, down_for = free_port(), 3.0
    with embedded_server(tmp_path / "first", dataset, flask_port=port) as first:
        qlib_client(port, timeout=90)
        with Asker() as asker:
            wait_until(lambda: asker.answered_since(0) >= 10, 60, what="10 answers before the restart")
            with WireClient(first.url) as busy:  # a slow request in flight: the server drains a few seconds
                busy.send("feature", slow_feature())
                wait_until(lambda: first.metric("qlib_server_tasks_published_total", type="feature") >= 1, 30,
                           what="the slow request computing")
                stopped = time.monotonic()
                first.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: first.proc.poll() is not None, 60, what="the first server to exit")
            exited = time.monotonic()
            time.sleep(down_for)  # the port stays closed a while: the downtime of a redeploy
            with embedded_server(tmp_path / "second", dataset, flask_port=port):
                restarted = time.monotonic()
                wait_until(lambda: asker.answered_since(restarted) >= 10, 60, what="10 answers after the restart")
                asker.stop()  # before the second server stops
    failed = [(round(sent - stopped, 2), repr(outcome)) for sent, _, outcome in asker.outcomes
              if not isinstance(outcome, list)]
    expected = asker.outcomes[0][2]
    longest = max(seconds for _, seconds, _ in asker.outcomes)
    draining = sum("asking again" in r.getMessage() for r in caplog.records)
    unreachable = sum("cannot connect" in r.getMessage() for r in caplog.records)
    before, after = asker.answered_since(0) - asker.answered_since(stopped), asker.answered_since(stopped)
    print(f"\nrestart: {len(asker.outcomes)} requests, {len(failed)} failed ({before} before SIGTERM, {after} during "
          f"and after); draining {exited - stopped:.1f}s, port "
          f"closed {restarted - exited:.1f}s (until the new server was ready); the client was told to retry "
          f"{draining} times and could not connect {unreachable} times; longest wait {longest:.1f}s")
    assert failed == []
    assert all(outcome == expected for _, _, outcome in asker.outcomes) and expected
    assert draining >= 1 and unreachable >= 1  # it met both: a draining server and a closed port
    assert longest >= down_for  # one request did wait out the downtime
    assert asker.answered_since(restarted) >= 10


def test_with_no_server_a_request_times_out_naming_the_address_not_as_a_refusal(qlib_client):
    from qlib.data import D

    from qlib_server.client import AdmissionRefused, RequestTimeout, ServerConnection

    port = free_port()  # nothing listens there
    qlib_client(port, timeout=3)
    body = {"instruments": ["SH600002"], "fields": ["$close"], "start_time": START, "end_time": END, "freq": "day",
            "disk_cache": 1}
    for ask in (lambda: D.list_instruments(D.instruments("csi300"), START, END, as_list=True),
                lambda: D.features(["SH600002"], ["$close"], START, END),  # asks the calendar first
                lambda: ServerConnection("127.0.0.1", port, timeout=3).features(body, ["$close"])):  # rows by HTTP
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=f"127.0.0.1:{port}") as info:
            ask()
        waited = time.monotonic() - started
        assert not isinstance(info.value, AdmissionRefused)
        assert 2.5 <= waited < 6, waited  # it kept trying for about the request's timeout
        print(f"\nno server: {info.value} after {waited:.1f}s")


def test_a_draining_server_answers_with_a_retry_flag_beside_what_the_stock_client_reads(dataset, tmp_path):
    """New requests to a draining server are answered ``"retry": true`` beside the envelope the stock pyqlib
    client reads (status 1, ``detailed_info``), which it raises as before."""
    calendar = {"start_time": START, "end_time": END, "freq": "day", "future": False}
    with embedded_server(tmp_path / "embedded", dataset) as server:
        with WireClient(server.url) as busy, WireClient(server.url) as client:
            assert client.request("calendar", calendar)["status"] == 0
            busy.send("feature", slow_feature())  # keeps the server draining a few seconds
            wait_until(lambda: server.metric("qlib_server_tasks_published_total", type="feature") >= 1, 30,
                       what="the slow request computing")
            server.proc.send_signal(signal.SIGTERM)
            answer = wait_until(lambda: (a := client.request("calendar", calendar, timeout=5)).get("retry") and a,
                                20, what="a draining answer")
            assert busy.receive("feature", 30)["status"] in (0, 2)  # the slow one is answered before the exit
    assert answer == {"status": 1, "detailed_info": "the server is shutting down; retry on another server or in a "
                      "moment", "result": None, "retry": True}
