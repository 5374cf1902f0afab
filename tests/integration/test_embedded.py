"""Embedded mode: ``qlib-server serve --embedded`` alone (no RabbitMQ, no Redis) serves real pyqlib
clients exactly like local Qlib, shares one task between identical requests, and stops cleanly.

Needs no services; it lives with the integration tests because it starts servers and Qlib clients.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest
import socketio
import yaml
from clients import WireClient, local_qlib, run_pyqlib
from conftest import ROOT, ServerProcess, free_port, wait_until

pytestmark = pytest.mark.integration

START, END = "2019-01-02", "2019-06-28"
FIELDS = ["$close", "Mean($close, 5)", "$volume / Ref($volume, 1)"]
CODES = ["SH600000", "SZ000001", "SH600002"]

CLIENT_SCRIPT = """
from qlib.data.client import Client
from qlib.data.data import ClientCalendarProvider
START, END, FIELDS, CODES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}
calendar = ClientCalendarProvider()
calendar.set_conn(Client("127.0.0.1", {port}))
spans = D.list_instruments(D.instruments("csi300"), START, END)
result = {{
    "calendar": [str(t) for t in calendar.calendar(START, END, "day")],
    "calendar_full": [str(t) for t in calendar.calendar(None, None, "day")],
    "list": D.list_instruments(D.instruments("csi300"), START, END, as_list=True),
    "spans": {{code: [[str(s), str(e)] for s, e in items] for code, items in spans.items()}},
    "features_cached": D.features(D.instruments("csi300"), FIELDS, START, END, disk_cache=1),
    "features_uncached": D.features(CODES, FIELDS, START, END, disk_cache=0),
}}
"""

LOCAL_SCRIPT = f"""
START, END, FIELDS, CODES = {START!r}, {END!r}, {FIELDS!r}, {CODES!r}
spans = D.list_instruments(D.instruments("csi300"), START, END)
result = {{
    "calendar": [str(t) for t in D.calendar(START, END, "day")],
    "calendar_full": [str(t) for t in D.calendar(None, None, "day")],
    "list": D.list_instruments(D.instruments("csi300"), START, END, as_list=True),
    "spans": {{code: [[str(s), str(e)] for s, e in items] for code, items in spans.items()}},
    "features_cached": D.features(D.instruments("csi300"), FIELDS, START, END),
    "features_uncached": D.features(CODES, FIELDS, START, END),
}}
"""


@contextmanager
def embedded_server(directory: Path, provider_uri: Path, preexec_fn=None, **overrides) -> Iterator[ServerProcess]:
    """``python -m qlib_server serve -c cfg --embedded`` in a subprocess, ready; stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"provider_uri": str(provider_uri), "region": "cn", "flask_server": "127.0.0.1",
              "flask_port": free_port(), "max_process": 2, "logging_level": "INFO", **overrides}
    config_path, log_path = directory / "embedded.yaml", directory / "embedded.log"
    config_path.write_text(yaml.safe_dump(config))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path), "--embedded"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=directory, preexec_fn=preexec_fn)
    server = ServerProcess(config, config_path, log_path, proc)
    try:
        wait_until(lambda: server.ready() or proc.poll() is not None, 120, what="embedded server ready")
        assert proc.poll() is None, f"embedded server exited:\n{server.log()[-3000:]}"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, dataset) -> Iterator[ServerProcess]:
    with embedded_server(tmp_path_factory.mktemp("embedded"), dataset) as server:
        yield server


@pytest.fixture(scope="module")
def local(dataset) -> dict:
    return local_qlib(LOCAL_SCRIPT, dataset)


def assert_same_frame(served: pd.DataFrame, local: pd.DataFrame) -> None:
    assert not local.empty
    assert sorted(served.columns) == sorted(local.columns) == sorted(FIELDS)
    pdt.assert_frame_equal(served[FIELDS].sort_index(), local[FIELDS].sort_index(), check_freq=False)


def test_real_pyqlib_clients_get_what_local_qlib_computes(embedded, local, dataset):
    script = CLIENT_SCRIPT.format(START=START, END=END, FIELDS=FIELDS, CODES=CODES, port=embedded.port)
    served = run_pyqlib(script, embedded.port, dataset)
    assert served["calendar"] == local["calendar"] and served["calendar"][0].startswith(START)
    assert served["calendar_full"] == local["calendar_full"] and len(served["calendar_full"]) == 750
    assert served["list"] == local["list"] and served["list"]
    assert served["spans"] == local["spans"]
    assert_same_frame(served["features_cached"], local["features_cached"])
    assert_same_frame(served["features_uncached"], local["features_uncached"])
    assert embedded.metric("qlib_server_tasks_processed_total", type="feature", status="0") >= 2
    assert "embedded mode" in embedded.log()


# The stock client's disconnect races its own writer thread; lost, it waits 30 s for an idle timeout.
STALL = 10.0
REPEATED_SCRIPT = """
import time
from qlib.data.filter import NameDFilter
pipe = [NameDFilter(name_rule_re="SH.*").to_config()]
result = []
for _ in range({calls}):
    t = time.perf_counter()
    names = D.list_instruments(D.instruments("csi300", filter_pipe=pipe), as_list=True)
    result.append((time.perf_counter() - t, names))
"""


@pytest.mark.timeout(900)  # on a stalling server 100 requests take far longer than the default 300 s
def test_a_hundred_requests_of_one_stock_pyqlib_client_in_a_row_never_stall(embedded, dataset):
    expected = local_qlib('''
from qlib.data.filter import NameDFilter
result = D.list_instruments(D.instruments("csi300", filter_pipe=[NameDFilter(name_rule_re="SH.*").to_config()]),
                            as_list=True)
''', dataset)
    calls = run_pyqlib(REPEATED_SCRIPT.format(calls=100), embedded.port, dataset, timeout=900)
    assert len(calls) == 100 and all(names == expected for _, names in calls)
    stalled = [round(seconds, 1) for seconds, _ in calls if seconds > STALL]
    assert not stalled, f"{len(stalled)} of 100 requests stalled: {stalled}"

LATE_CLOSE = "late (pyqlib's stock client)"


def test_only_the_stock_pyqlib_client_gets_its_close_frame_answered_late(embedded, dataset):
    """The 0.5 s pause before the server's close reply (the workaround the test above needs) is for
    pyqlib's stock client alone: asyncio clients, on the WebSocket transport or upgraded from polling,
    have their close frames answered at once, and their disconnect waits for no pause."""
    body = {"head": {"version": "0.9.7"}, "body": json.dumps({"start_time": None, "end_time": None, "freq": "day",
                                                              "future": False})}

    async def one_request(transports):
        sio, answers = socketio.AsyncClient(reconnection=False), asyncio.Queue()
        sio.on("calendar_response", answers.put)
        await sio.connect(embedded.url, transports=transports, wait_timeout=10)
        await sio.emit("calendar_request", body)
        answer = await asyncio.wait_for(answers.get(), 60)
        await sio.disconnect()  # returns once the server's close frame is in
        return answer

    before = embedded.log().count(LATE_CLOSE)  # the module's server also served the stock client above
    for transports in (["websocket"], ["polling", "websocket"]):
        answer = asyncio.run(one_request(transports))
        assert answer["status"] == 0 and len(answer["result"]) == 750
    assert embedded.log().count(LATE_CLOSE) == before

    # a stock client whose CLOSE packet the server gets first is closed by the server (no close frame to answer):
    # about 1 request in 10, so a few requests
    run_pyqlib(REPEATED_SCRIPT.format(calls=5), embedded.port, dataset)
    wait_until(lambda: embedded.log().count(LATE_CLOSE) > before, 30, what="the stock client's close answered late")


# enough work that every request of the crowd is registered long before the task is done
HEAVY_FIELDS = ["Mean($close, 5)", "Std($volume, 20)", "Corr($close, $volume, 10)", "Rsquare($close, 20)",
                "Slope($volume, 30)", "Resi($close, 15)", "Corr($high, $low, 30)"]


def close_all(clients: list[WireClient]) -> None:
    """Disconnect every client at once (a graceful Socket.IO disconnect from this server takes seconds)."""
    with ThreadPoolExecutor(len(clients) or 1) as pool:
        list(pool.map(WireClient.close, clients))


def test_identical_concurrent_requests_make_one_task(embedded):
    crowd = 40
    salt = uuid.uuid4().int % 10_000  # a feature set no earlier request put in the dataset cache
    body = {"instruments": {"market": "all", "filter_pipe": []}, "freq": "day", "disk_cache": 1,
            "fields": [f"{op} + {salt}" for op in HEAVY_FIELDS]}
    before = {name: embedded.metric(f"qlib_server_{name}_total", type="feature")
              for name in ("tasks_published", "dedup_hits", "cache_hits")}
    clients = [WireClient(embedded.url) for _ in range(crowd)]
    try:
        for client in clients:
            client.send("feature", body)
        answers = [client.receive("feature", 120) for client in clients]
    finally:
        close_all(clients)
    assert [a["status"] for a in answers] == [0] * crowd, {a["detailed_info"] for a in answers}
    assert len({a["result"] for a in answers}) == 1
    added = {name: embedded.metric(f"qlib_server_{name}_total", type="feature") - value
             for name, value in before.items()}
    print(f"\n{crowd} identical concurrent requests: {added['tasks_published']:g} task(s), "
          f"{added['dedup_hits']:g} joined a task in flight, {added['cache_hits']:g} answered from the result cache")
    assert added["dedup_hits"] + added["cache_hits"] == crowd - added["tasks_published"]
    assert added["tasks_published"] == 1, "identical requests must share one task"


def test_the_embedded_server_holds_the_demos_300_clients_with_no_error_and_no_warning(tmp_path, dataset):
    """The demo's load: 300 simulated clients, every answer checked against Qlib reading the data locally."""
    with embedded_server(tmp_path / "crowd", dataset, logging_level="WARNING") as server:
        done = subprocess.run([sys.executable, "-m", "sim", "--server", server.url, "--data", str(dataset),
                               "--clients", "300", "--duration", "8", "--json", str(tmp_path / "sim.json")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        log = server.log()
    report = json.loads((tmp_path / "sim.json").read_text())
    figures = {k: report[k] for k in ("requests", "errors", "timeouts", "connect_errors", "wrong_answers")}
    print(f"\n300 simulated clients for 8 s on the embedded server: {figures}; "
          f"latency ms {report['latency_ms']}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert figures["errors"] == figures["timeouts"] == figures["connect_errors"] == figures["wrong_answers"] == 0
    assert figures["requests"] >= 300  # every client answered at least once
    noisy = [line for line in log.splitlines() if any(w in line for w in ("WARNING", "ERROR", "Traceback", "Werkzeug"))]
    assert not noisy, "\n".join(noisy[:20])


def test_sigterm_stops_the_embedded_server_cleanly(tmp_path, dataset):
    with embedded_server(tmp_path / "sigterm", dataset) as server:
        with WireClient(server.url) as client:
            answer = client.request("calendar", {"start_time": START, "end_time": END, "freq": "day"})
            assert answer["status"] == 0 and len(answer["result"]) > 100
            salt = uuid.uuid4().int % 10_000
            client.send("feature", {"instruments": {"market": "all", "filter_pipe": []}, "disk_cache": 1,
                                    "fields": [f"Mean($close, 10) * {salt}", f"Std($close, 10) * {salt}"]})
            wait_until(lambda: server.metric("qlib_server_requests_total", type="feature") == 1, 10,
                       what="the feature request received")
            server.proc.send_signal(signal.SIGTERM)
            in_flight = client.receive("feature", 30)
        shut_down = in_flight["status"] == 2 and "shutting down" in in_flight["detailed_info"]
        assert in_flight["status"] == 0 or shut_down, in_flight
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 30 s after SIGTERM:\n{server.log()[-3000:]}") from None
        assert code == 0, server.log()[-3000:]
        assert "Traceback" not in server.log(), server.log()[-3000:]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_sigterm_stops_a_server_started_with_sigint_ignored(tmp_path, dataset):
    """``qlib-server serve ... &`` in a shell script starts with SIGINT ignored; SIGTERM must still stop it."""
    with embedded_server(tmp_path / "nointr", dataset, preexec_fn=ignore_sigint) as server:
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
            raise AssertionError("still running 20 s after SIGTERM") from None
        assert code == 0, server.log()[-3000:]


def test_the_embedded_server_shows_its_handler_processor_and_workers_on_its_status_page(embedded):
    import requests

    assert requests.get(embedded.url + "/", timeout=10).status_code == 200
    with WireClient(embedded.url) as client:
        body = {"start_time": "2019-05-06", "end_time": "2019-05-31", "freq": "day", "future": False}
        assert client.request("calendar", body)["status"] == 0

    def view():
        return requests.get(embedded.url + "/status.json", timeout=10).json()

    wait_until(lambda: view()["totals"].get('qlib_server_processor_tasks_total{outcome="ok",type="calendar"}'), 10,
               what="the computed calendar task on the status page")
    shown = view()
    assert (len(shown["handlers"]), len(shown["processors"])) == (1, 1)
    assert [w["lane"] for w in shown["processors"][0]["workers"]] == ["main", "main", "light"]
    assert shown["processors"][0]["pid"] == shown["handlers"][0]["pid"]  # one process


def test_the_server_is_ready_only_once_its_feature_workers_have_loaded_the_kernels(tmp_path, dataset, monkeypatch):
    """Feature workers load (or, in a fresh clone, compile) the engine's kernels one after the other, under a
    file lock, before they take a task; /readyz says ready only then. Holding that lock here keeps them
    loading: the light lane answers meanwhile and the server is not ready until the lock is released."""
    import fcntl
    import os

    import requests

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the compute processes find the lock file there
    lock = open(tmp_path / f"qlib-server-kernels-{os.getuid()}.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    config = {"provider_uri": str(dataset), "region": "cn", "flask_server": "127.0.0.1", "flask_port": free_port(),
              "max_process": 2, "logging_level": "INFO"}
    config_path = tmp_path / "embedded.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with open(tmp_path / "embedded.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path), "--embedded"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = ServerProcess(config, config_path, tmp_path / "embedded.log", proc)
    try:
        wait_until(lambda: server.ready(processors=False) or proc.poll() is not None, 120, what="handler up")
        with WireClient(server.url) as client:
            answer = client.request("calendar", {"start_time": START, "end_time": END, "freq": "day"}, timeout=120)
        assert answer["status"] == 0 and answer["result"]
        readyz = requests.get(f"{server.url}/readyz", timeout=5)
        assert readyz.status_code == 503 and readyz.json()["processors"] is False
        fcntl.flock(lock, fcntl.LOCK_UN)
        wait_until(server.ready, 120, what="ready once the kernels are loaded")
    finally:
        lock.close()
        server.stop()
