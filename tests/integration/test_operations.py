"""Operations: graceful shutdown, rolling restarts of the data processor, health probes, data updates
and the request log.
"""

from __future__ import annotations

import queue
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pika
import pytest
import requests
import yaml
from clients import WireClient, local_qlib
from conftest import ServerProcess, free_port, wait_until
from faults import proxy_to, slow_terms
from qlib.data.cache import DiskDatasetCache

from qlib_server.broker.base import dead_letter_queue
from qlib_server.config import load_config
from qlib_server.datagen import extend_dataset, generate_dataset
from qlib_server.protocol import Limits, RequestParser
from qlib_server.state import keys

pytestmark = pytest.mark.integration

SHUTTING_DOWN = "shutting down"


def slow_feature(tag: int, terms: int = 3) -> dict:
    """A feature request no other asks for (``tag``), that takes a worker about a second
    (:func:`faults.slow_terms`)."""
    return {"instruments": {"market": "all", "filter_pipe": []}, "disk_cache": 1, "freq": "day",
            "fields": slow_terms(terms, tag)}


def connect_all(url: str, n: int) -> list[WireClient]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: WireClient(url), range(n)))


def close_all(clients: list[WireClient]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(WireClient.close, clients))


def answered(clients: list[WireClient], kind: str = "feature") -> int:
    return sum(c.responses[kind].qsize() for c in clients)


# --- shutdown and restarts ----------------------------------------------------------------------------


def test_sigterm_answers_every_request_in_flight_and_exits_cleanly(start_server):
    server = start_server(max_process=1)
    clients = connect_all(server.url, 6)
    try:
        base = random.randrange(10**6)
        for i, client in enumerate(clients):
            client.send("feature", slow_feature(base + i))
        wait_until(lambda: server.metric("qlib_server_tasks_published_total", type="feature") == len(clients), 30,
                   what="every request queued")
        server.proc.send_signal(signal.SIGTERM)
        answers = []
        for client in clients:
            try:
                answers.append(client.receive("feature", 60))
            except queue.Empty:  # this client was left without an answer
                answers.append(None)
    finally:
        close_all(clients)
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server still running 60 s after SIGTERM:\n{server.log()[-3000:]}") from None
    outcomes = ["silence" if a is None else "ok" if a["status"] == 0 else
                "shutting down" if a["status"] == 2 and SHUTTING_DOWN in (a["detailed_info"] or "") else repr(a)
                for a in answers]
    print(f"\nin flight at SIGTERM: {len(clients)} requests -> {outcomes}")
    assert set(outcomes) <= {"ok", "shutting down"}, outcomes
    assert code == 0, server.log()[-3000:]


def stop_mid_work(start_server, clients: list[WireClient], **overrides) -> int:
    """Start a processor on the queued tasks, SIGTERM it once it has answered one, wait for it to exit
    (code 0), then start another; return how many answers came before the second one started."""
    first = start_server(modules=("data_processor",), wait=False, max_process=1, **overrides)
    wait_until(lambda: answered(clients) >= 1, 120, what="the first processor at work")
    first.stop(60)
    done_by_first = answered(clients)
    assert first.proc.returncode == 0, first.log()[-3000:]
    assert done_by_first < len(clients), "the first processor was meant to be stopped mid-work"
    start_server(modules=("data_processor",), wait=False, max_process=1, **overrides)
    return done_by_first


def queue_slow_tasks(handler, clients: list[WireClient]) -> None:
    base = random.randrange(10**6)
    for i, client in enumerate(clients):
        client.send("feature", slow_feature(base + i))
    wait_until(lambda: handler.metric("qlib_server_tasks_published_total", type="feature") == len(clients), 30,
               what="every task queued with no processor running")


def test_a_rolling_restart_of_the_data_processor_loses_no_task(start_server):
    handler = start_server(modules=("request_handler",))
    clients = connect_all(handler.url, 8)
    try:
        queue_slow_tasks(handler, clients)
        done_by_first = stop_mid_work(start_server, clients)
        answers = [client.receive("feature", 120) for client in clients]
    finally:
        close_all(clients)
    print(f"\n{len(clients)} queued tasks: {done_by_first} answered before the first processor stopped, "
          f"the rest after the second started; results of redelivered tasks: "
          f"{handler.metric('qlib_server_tasks_redelivered_total', type='feature'):g}")
    assert [a["status"] for a in answers] == [0] * len(clients), {a["detailed_info"] for a in answers}
    assert len({a["result"] for a in answers}) == len(clients)
    assert handler.metric("qlib_server_tasks_processed_total", type="feature", status="0") == len(clients)
    assert handler.metric("qlib_server_tasks_dead_lettered_total", type="feature") == 0


def queued_messages(services, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(services.amqp_url()))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def test_a_graceful_processor_stop_hands_back_no_task_as_a_failed_delivery(start_server, services):
    """With ``max_deliveries: 1`` a task handed back is dead-lettered at once: a SIGTERM must hand back
    none, leaving the tasks it did not run queued as they were."""
    handler = start_server(modules=("request_handler",), max_deliveries=1)
    clients = connect_all(handler.url, 3)
    try:
        queue_slow_tasks(handler, clients)
        processor = start_server(modules=("data_processor",), wait=False, max_process=1, max_deliveries=1)
        wait_until(lambda: answered(clients) >= 1, 120, what="the processor at work")
        processor.stop(60)
        assert processor.proc.returncode == 0, processor.log()[-3000:]
        done = answered(clients)
        statuses = [c.receive("feature", 0.1)["status"] for c in clients if c.responses["feature"].qsize()]
    finally:
        close_all(clients)
    task_queue = handler.config["task_queue"]
    dead_lettered = queued_messages(services, dead_letter_queue(task_queue)) + \
        handler.metric("qlib_server_tasks_dead_lettered_total", type="feature")
    print(f"\n{len(clients)} queued tasks, {done} answered before the processor stopped ({statuses}); "
          f"dead-lettered: {dead_lettered:g}")
    assert dead_lettered == 0 and set(statuses) == {0}
    assert queued_messages(services, task_queue) == len(clients) - done


# --- health probes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(services, dataset, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server (both modules) for the tests that only look at it, so they pay for one start."""
    directory = tmp_path_factory.mktemp("operations")
    suffix = uuid.uuid4().hex[:8]
    config = {"provider_uri": str(dataset), "region": "cn", "flask_server": "127.0.0.1", "flask_port": free_port(),
              "queue_host": services.amqp_host, "queue_port": services.amqp_port, "redis_host": services.redis_host,
              "redis_port": services.redis_port, "redis_task_db": services.fresh_db(), "task_queue": f"tasks-{suffix}",
              "message_queue": f"results-{suffix}", "max_process": 1, "logging_level": "INFO"}
    config_path, log_path = directory / "server.yaml", directory / "server.log"
    config_path.write_text(yaml.safe_dump(config))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    server = ServerProcess(config, config_path, log_path, proc)
    try:
        wait_until(lambda: server.ready() or proc.poll() is not None, 120, what="server ready")
        assert proc.poll() is None, server.log()[-3000:]
        yield server
    finally:
        server.stop()


def status_of(url: str) -> int:
    return requests.get(url, timeout=30).status_code


def test_readiness_follows_redis_and_liveness_does_not(start_server, services):
    with proxy_to(services.redis_host, services.redis_port) as redis_proxy:
        server = start_server(redis_host="127.0.0.1", redis_port=redis_proxy.port)
        assert status_of(f"{server.url}/healthz") == 200
        assert status_of(f"{server.url}/readyz") == 200
        with redis_proxy.stalled():  # Redis holds every connection and answers nothing, like a paused host
            started = time.monotonic()
            not_ready = requests.get(f"{server.url}/readyz", timeout=90)
            print(f"\n/readyz answered {not_ready.status_code} {time.monotonic() - started:.1f}s after Redis "
                  "stopped answering")
            assert not_ready.status_code == 503
            assert not_ready.json()["redis"] is False and not_ready.json()["ready"] is False
            assert status_of(f"{server.url}/healthz") == 200, "liveness must not depend on Redis"
        wait_until(lambda: status_of(f"{server.url}/readyz") == 200, 60, what="ready again after Redis came back")


# --- data updates --------------------------------------------------------------------------------------

FIELDS = ["$close", "Mean($close, 5)"]


def read_cache(root: Path, uri: str) -> pd.DataFrame:
    assert isinstance(uri, str) and uri and "/" not in uri, uri
    return DiskDatasetCache.read_data_from_cache(root / "dataset_cache" / uri, None, None, FIELDS)


def assert_same_frame(served: pd.DataFrame, local: pd.DataFrame) -> None:
    assert not local.empty
    pdt.assert_frame_equal(served[FIELDS].sort_index(), local[FIELDS].sort_index(), check_freq=False)


def test_a_data_update_reaches_calendars_and_feature_caches(start_server, services, tmp_path):
    root = generate_dataset(tmp_path / "updated", instruments=10, days=200)
    old_days = (root / "calendars" / "day.txt").read_text().split()
    server = start_server(provider_uri=str(root), data_check_interval=1)
    calendar_body = {"start_time": None, "end_time": None, "freq": "day", "future": False}
    feature_body = {"instruments": {"market": "all", "filter_pipe": []}, "fields": FIELDS, "disk_cache": 1}
    with WireClient(server.url) as client:
        calendar = client.request("calendar", calendar_body)
        assert calendar["status"] == 0 and len(calendar["result"]) == 200
        first = client.request("feature", feature_body)
        assert first["status"] == 0, first
        served_before = read_cache(root, first["result"])

        extend_dataset(root, 5)
        days = (root / "calendars" / "day.txt").read_text().split()
        assert len(days) == 205 and days[:200] == old_days
        wait_until(lambda: len(client.request("calendar", calendar_body, timeout=30)["result"]) == 205, 90,
                   interval=0.5, what="the calendar answer to grow to 205 days")
        second = client.request("feature", feature_body)
    assert second["status"] == 0, second
    served_after = read_cache(root, second["result"])
    # history is untouched by an update, so local Qlib on the updated data answers for both moments
    local = local_qlib(f"""
fields = {FIELDS!r}
result = (D.features(D.instruments("all"), fields, end_time={old_days[-1]!r}), D.features(D.instruments("all"), fields))
""", root)
    assert_same_frame(served_before, local[0])
    assert served_after.index.get_level_values("datetime").max() == pd.Timestamp(days[-1])
    assert_same_frame(served_after, local[1])

    redis_db = services.redis_client(server.config["redis_task_db"])
    generation = int(redis_db.get(keys.GENERATION))
    refreshed = subprocess.run([sys.executable, "-m", "qlib_server", "refresh", "-c", str(server.config_path)],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refreshed.returncode == 0, refreshed.stderr[-3000:]
    assert int(redis_db.get(keys.GENERATION)) == generation + 1


# --- the request log -----------------------------------------------------------------------------------

def request_key(kind: str, body: dict) -> str:
    """The canonical key the server gives a request (what its log lines name)."""
    parser = RequestParser(">=0.4.0", Limits(), lambda expression: expression)
    return parser.parse(kind, {"head": {"version": "0.9.7"}, "body": body}).key


def task_line(key: str) -> re.Pattern:
    return re.compile(rf"calendar task {key} status=0 answered 1 client\(s\) in \d+\.\d+s")


def test_an_answered_task_leaves_a_log_line_with_key_type_outcome_and_time(shared_server):
    server, body = shared_server, {"start_time": "2019-03-01", "end_time": "2019-03-29"}
    with WireClient(server.url) as client:
        assert client.request("calendar", body)["status"] == 0
        refused = client.request("calendar", {"freq": "fortnight"})
    assert refused["status"] == 1
    wait_until(lambda: task_line(request_key("calendar", body)).search(server.log()), 10, what="the task's log line")
    assert re.search(r"refused calendar request from \S+: freq must be", server.log())


def test_every_answered_request_leaves_its_own_log_line(shared_server):
    server, body = shared_server, {"start_time": "2019-04-01", "end_time": "2019-04-30"}
    key = request_key("calendar", body)
    with WireClient(server.url) as client:
        client_sid = client.sio.get_sid()
        assert client.request("calendar", body)["status"] == 0
        wait_until(lambda: task_line(key).search(server.log()), 10, what="the task's log line")
        assert client.request("calendar", body)["status"] == 0  # answered from the result cache
    lines = [line for line in server.log().splitlines()
             if f"calendar request of {client_sid}" in line and f"key={key}" in line and "status=0" in line
             and re.search(r"answered .*in \d+\.\d+ ms", line)]
    assert len(lines) == 2, lines  # one through the task, one from the result cache


# --- the deployment files --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_the_compose_stack_and_its_config_agree():
    """deploy/config.yaml is a valid config naming the compose services, and every app container runs
    the modules its role needs, mounts the shared data and the config, and is health-checked on /healthz."""
    cfg = load_config(ROOT / "deploy" / "config.yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    rabbit_env = services["rabbitmq"]["environment"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13") and services["redis"]["image"] == "redis:7"
    assert (cfg.queue_host, cfg.redis_host, cfg.provider_uri, cfg.flask_server) == ("rabbitmq", "redis", "/data",
                                                                                    "0.0.0.0")
    assert (cfg.queue_user, cfg.queue_pwd) == (rabbit_env["RABBITMQ_DEFAULT_USER"], rabbit_env["RABBITMQ_DEFAULT_PASS"])
    assert cfg.socketio_message_queue is None  # handlers forward answers themselves

    handlers = [name for name, s in services.items() if "request_handler" in s.get("command", [])]
    processors = [name for name, s in services.items() if "data_processor" in s.get("command", [])]
    assert len(handlers) == 2 and processors == ["processor"]
    assert services["processor"]["deploy"]["replicas"] == 2
    for name in handlers + processors:
        service = services[name]
        assert service["command"][:4] == ["qlib-server", "serve", "-c", "/etc/qlib-server/config.yaml"], name
        assert "qlib-data:/data" in service["volumes"], name
        assert "./deploy/config.yaml:/etc/qlib-server/config.yaml:ro" in service["volumes"], name
    assert sorted(p.split(":")[-1] for h in handlers for p in services[h]["ports"]) == [str(cfg.flask_port)] * 2
    for name in handlers:
        assert "/healthz" in " ".join(services[name]["healthcheck"]["test"]) and str(cfg.flask_port) in \
            " ".join(services[name]["healthcheck"]["test"]), name
    assert "qlib-data" in compose["volumes"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "USER qlib" in dockerfile and "EXPOSE 9710" in dockerfile
    assert 'CMD ["qlib-server", "serve", "-c", "/etc/qlib-server/config.yaml"]' in dockerfile
