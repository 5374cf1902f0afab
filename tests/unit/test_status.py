"""The status page's parts in one process: fleet snapshots in (fake) Redis, their sums, what workers
report to their processor, the admission rule over HTTP, and a handler's page, events and view."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import fakeredis
import pytest
import requests

from qlib_server.admission import Admission
from qlib_server.broker.memory import MemoryBroker
from qlib_server.config import make_config
from qlib_server.front.handler import RequestHandler
from qlib_server.metrics import ProcessorMetrics, samples
from qlib_server.state import keys
from qlib_server.state.fleet import read, remove, totals, write
from qlib_server.state.registry import SessionRegistry
from qlib_server.worker.telemetry import ProcessorStatus, describe, serve_metrics

TASK = {"key": "k" * 40, "type": "feature", "args": {"instruments": {"market": "csi300", "filter_pipe": []},
                                                     "fields": ["$close", "Mean($close, 5)"]}}


def config(**values):
    return make_config(provider_uri="/nonexistent/qlib-data", task_queue="tasks", message_queue="results",
                       async_mode="threading", **values)


@pytest.fixture
def redis_db():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def test_a_snapshot_is_read_back_until_it_expires_or_its_process_removes_it(redis_db):
    write(redis_db, "handler", "a", {"id": "a", "samples": {"x": 1.0}})
    write(redis_db, "processor", "b", {"id": "b", "samples": {"x": 2.0}})
    assert sorted(s["id"] for s in read(redis_db)) == ["a", "b"]
    assert 0 < redis_db.ttl(keys.fleet("handler", "a")) <= keys.FLEET_TTL
    remove(redis_db, "processor", "b")
    redis_db.delete(keys.fleet("handler", "a"))  # what its expiry does
    assert read(redis_db) == []
    assert redis_db.smembers(keys.FLEET_INDEX) == set()  # the reader dropped the expired member


def test_samples_add_up_over_the_fleet_but_queue_depths_are_not_summed():
    fleet = [{"samples": {'qlib_server_requests_total{type="calendar"}': 2.0,
                          'qlib_server_queue_messages{queue="light"}': 3.0}},
             {"samples": {'qlib_server_requests_total{type="calendar"}': 5.0,
                          'qlib_server_queue_messages{queue="light"}': 3.0}}]
    assert totals(fleet) == {'qlib_server_requests_total{type="calendar"}': 7.0}


def test_samples_are_named_with_their_labels_in_alphabetical_order_and_no_created_timestamps():
    metrics = ProcessorMetrics()
    metrics.tasks.labels("feature", "ok").inc()
    metrics.task_seconds.labels("feature").observe(0.3)
    named = samples(metrics.registry)
    assert named['qlib_server_processor_tasks_total{outcome="ok",type="feature"}'] == 1
    assert named['qlib_server_processor_task_seconds_bucket{le="0.5",type="feature"}'] == 1
    assert not [name for name in named if "_created" in name]


def test_a_task_is_described_in_one_short_line():
    assert describe(TASK) == "features $close and 1 more field(s) of market csi300"
    assert describe({"type": "instrument", "args": {"instruments": {"market": "all", "filter_pipe": [{}, {}]}}}) \
        == "instrument list of market all with 2 filter(s)"
    assert describe({"type": "calendar", "args": {"freq": "day", "start_time": "2019-01-02", "end_time": None}}) \
        == "day calendar 2019-01-02 to …"
    spans = {"SH600000": [["2019-01-02 00:00:00", "2019-03-01 00:00:00"]], "SZ000001": []}
    processors = [{"class": "qlib.data.dataset.processor.TimeRangeFlt", "kwargs": {}}]
    assert describe({"type": "feature", "args": {"instruments": spans, "fields": ["$close"],
                                                 "inst_processors": processors}}) \
        == "features $close of 2 instrument(s) with spans and 1 inst_processor(s)"


def test_worker_reports_over_a_pipe_become_the_task_in_hand_its_outcome_and_redeliveries():
    status = ProcessorStatus(config(), ["main", "light"], count_errors=False)
    reader, writer = mp.Pipe(duplex=False)
    status.watch(0, reader)
    stop = threading.Event()
    collector = threading.Thread(target=status.collect, args=(stop,), daemon=True)
    collector.start()
    try:
        started = time.time()
        writer.send(("start", "feature", TASK["key"], describe(TASK), started, 1))
        deadline = time.monotonic() + 5
        while status.current[0] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        snapshot = status.snapshot([(11, started), (12, 0.0)])
        assert snapshot["workers"][0]["task"]["what"] == describe(TASK) and snapshot["workers"][1]["task"] is None
        assert snapshot["samples"]['qlib_server_processor_busy_workers{lane="main"}'] == 1
        assert snapshot["samples"]['qlib_server_processor_redeliveries_total{type="feature"}'] == 1
        writer.send(("done", "feature", 2, 0.25, 3))
        writer.close()  # the worker is gone: the collector closes its end
        while not reader.closed and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        collector.join(5)
    named = status.snapshot([(11, 0.0), (12, 0.0)])["samples"]
    assert named['qlib_server_processor_tasks_total{outcome="failed",type="feature"}'] == 1
    assert named["qlib_server_processor_engine_fallbacks_total"] == 3
    assert named['qlib_server_processor_busy_workers{lane="main"}'] == 0 and status.current == [None, None]


def test_a_killed_workers_task_is_counted_by_its_outcome_once():
    status = ProcessorStatus(config(), ["main"], count_errors=False)
    status.on_report(0, ("start", "instrument", "k", "instrument list", time.time(), 0))
    status.lost(0, "timed_out")
    status.lost(0, "worker_died")  # found dead right after: that task was counted already
    named = samples(status.metrics.registry)
    assert named['qlib_server_processor_tasks_total{outcome="timed_out",type="instrument"}'] == 1
    assert 'qlib_server_processor_tasks_total{outcome="worker_died",type="instrument"}' not in named


@pytest.mark.parametrize("networks, token, address, authorization, query, admitted", [
    ([], None, "203.0.113.9", None, "", True),
    (["10.0.0.0/8"], None, "10.1.2.3", None, "", True),
    (["10.0.0.0/8"], None, "203.0.113.9", None, "", False),
    (["10.0.0.0/8"], "t0k", "203.0.113.9", "Bearer t0k", "", True),
    (["10.0.0.0/8"], "t0k", "203.0.113.9", None, "token=t0k", True),
    (["10.0.0.0/8"], "t0k", "203.0.113.9", "Bearer nope", "token=nope", False),
    ([], "t0k", "127.0.0.1", "Basic dDBr", "", False),
])
def test_http_admission_is_the_rule_of_socketio_clients(networks, token, address, authorization, query, admitted):
    assert Admission(networks, token).admits_http(address, authorization, query) is admitted


def test_processor_metrics_are_served_in_prometheus_format_to_admitted_clients_only():
    metrics = ProcessorMetrics()
    metrics.dead_letters.labels("feature").inc()
    port = serve_metrics(metrics.registry, "127.0.0.1", 0, Admission(["10.0.0.0/8"], "t0k"))
    url = f"http://127.0.0.1:{port}/metrics"
    assert requests.get(url, timeout=5).status_code == 403
    reply = requests.get(url, headers={"Authorization": "Bearer t0k"}, timeout=5)
    assert reply.status_code == 200 and 'qlib_server_processor_dead_letters_total{type="feature"} 1.0' in reply.text


def test_a_taken_metrics_port_falls_back_to_a_free_one():
    first = serve_metrics(ProcessorMetrics().registry, "127.0.0.1", 0, Admission([], None))
    second = serve_metrics(ProcessorMetrics().registry, "127.0.0.1", first, Admission([], None))
    assert second not in (None, first)
    assert requests.get(f"http://127.0.0.1:{second}/", timeout=5).ok


def test_a_handlers_view_sums_itself_and_every_process_in_redis(redis_db):
    cfg = config()
    handler = RequestHandler(cfg, SessionRegistry(redis_db, 60), MemoryBroker().connect)
    handler.metrics.requests.labels("calendar").inc(2)
    processor = ProcessorStatus(cfg, ["main", "light"], count_errors=False)
    processor.on_report(0, ("start", "feature", TASK["key"], describe(TASK), time.time() - 3, 0))
    write(redis_db, "processor", processor.identity["id"], processor.snapshot([(7, time.time() - 3), (8, 0.0)]))
    write(redis_db, "handler", "other", {"kind": "handler", "id": "other", "started": 0, "address": "h:1",
                                         "samples": {'qlib_server_requests_total{type="calendar"}': 3.0}})
    client = handler.app.test_client()
    view = client.get("/status.json").get_json()
    assert view["totals"]['qlib_server_requests_total{type="calendar"}'] == 5
    assert view["totals"]['qlib_server_processor_busy_workers{lane="main"}'] == 1
    assert 'qlib_server_queue_messages{queue="light"}' not in view["totals"]  # not sampled yet
    handler.publisher.publish("tasks.light", {"key": "k", "type": "calendar"})
    handler.status._sample_queues()  # what its loop does each second
    view = client.get("/status.json").get_json()
    assert view["totals"]['qlib_server_queue_messages{queue="light"}'] == 1
    assert [h["id"] for h in view["handlers"]] == ["other", handler.node]
    assert view["handlers"][1]["requests"] == 2
    worker = view["processors"][0]["workers"][0]
    assert worker["task"]["what"] == describe(TASK) and worker["seconds"] >= 3
    page = client.get("/")
    assert page.status_code == 200 and b'data-metric' in page.data and b"<script src" not in page.data
    assert b"http://" not in page.data and b"https://" not in page.data  # nothing loaded from elsewhere


def test_the_page_events_and_metrics_are_refused_to_a_client_not_admitted(redis_db):
    handler = RequestHandler(config(allowed_networks=["10.0.0.0/8"], auth_token="t0k"), SessionRegistry(redis_db, 60),
                             MemoryBroker().connect)
    client = handler.app.test_client()
    for path in ("/", "/status.json", "/status/events", "/metrics"):
        assert client.get(path).status_code == 403, path
    assert client.get("/metrics", headers={"Authorization": "Bearer t0k"}).status_code == 200
    assert client.get("/?token=t0k").status_code == 200
    assert client.get("/healthz").status_code == 200
