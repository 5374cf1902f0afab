"""``qlib_server.client``: Qlib with no shared mount gets what local Qlib gives, over one connection
that survives a server restart, never waits past its timeout, and is refused without admission.

The client's ``provider_uri`` is an empty directory (or unset): everything comes from the server.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pandas.testing as pdt
import pytest
from clients import local_qlib, run_server_client
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


def assert_same(served: dict, local: dict) -> None:
    assert served.keys() == local.keys()
    for name, expected in local.items():
        got = served[name]
        if isinstance(expected, pd.DataFrame):
            pdt.assert_frame_equal(got, expected, obj=name)  # values, index, columns and dtypes, in order
        elif hasattr(expected, "dtype"):
            assert list(got) == list(expected) and got.dtype == expected.dtype, name
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
    assert server.metric("qlib_server_tasks_published_total", type="feature") == published  # nothing computed again


def test_alpha158_over_a_market_equals_local_qlib(server, dataset, tmp_path):
    expected = local_qlib(ALPHA158, dataset)
    assert expected["alpha158"].shape[1] == 158 and len(expected["alpha158"]) > 1000
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert_same(run_server_client(ALPHA158, server.port, empty), expected)


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


def test_refused_admission_is_raised_and_the_token_admits(start_server, qlib_client):
    from qlib.data import D

    from qlib_server.client import AdmissionRefused, ServerConnection

    server = start_server(allowed_networks=["10.0.0.0/8"], auth_token="s3cret")
    qlib_client(server.port)
    with pytest.raises(AdmissionRefused, match="refused this client"):
        D.calendar()
    body = {"instruments": ["SH600002"], "fields": ["$close"], "start_time": START, "end_time": END, "freq": "day",
            "disk_cache": 1}
    with pytest.raises(AdmissionRefused):  # the feature transfer endpoint is guarded the same way
        ServerConnection("127.0.0.1", server.port, timeout=10).features(body, ["$close"])
    assert server.metric("qlib_server_refused_connections_total") >= 2
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
