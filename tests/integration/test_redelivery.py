"""Tasks outlive the processes handling them: killed workers, restarted servers, poison tasks and
responders that die holding results."""

from __future__ import annotations

import os
import signal
import statistics
import time

import pandas as pd
from clients import WireClient
from conftest import wait_until
from faults import (
    busy_workers,
    calendar_body,
    cpu_seconds,
    crowd,
    feature_body,
    proxy_to,
    queue_depth,
    salt,
    slow_instrument_body,
    slow_terms,
    trading_days,
    worker_processes,
    workers_consuming,
)

from qlib_server.broker.base import light_queue

PROCESSED = "qlib_server_tasks_processed_total"


def window(answer: dict) -> list[str]:
    return [pd.Timestamp(day).strftime("%Y-%m-%d") for day in answer["result"]]


def all_codes(dataset) -> list[str]:
    return sorted(line.split("\t")[0] for line in (dataset / "instruments" / "all.txt").read_text().splitlines())


def slow_request(kind: str, tag: int, terms: int) -> dict:
    """A task that keeps a worker busy for seconds: an instrument list filtered by a slow expression
    (no Qlib cache lock involved), or a feature set written to Qlib's dataset cache."""
    return slow_instrument_body(terms, tag) if kind == "instrument" else feature_body(slow_terms(terms, tag))


def test_tasks_of_killed_workers_are_computed_by_other_workers(start_server, services, dataset):
    """Both feature workers are SIGKILLed mid-task: one computing an instrument list filtered by a slow
    expression (no Qlib lock involved), the other writing a feature set to Qlib's dataset cache (and
    so holding Qlib's Redis lock on that cache file)."""
    handler = start_server(modules=("request_handler",))
    processor = start_server(modules=("data_processor",), wait=False)
    wait_until(lambda: workers_consuming(services, processor.config), 90, what="every worker consuming")
    workers = worker_processes(processor)
    baseline = [cpu_seconds(w) for w in workers]
    kinds, tag = ("instrument", "feature"), salt()
    with crowd([handler.url], 10) as waiting:
        for i, client in enumerate(waiting.clients):
            client.send(kinds[i % 2], slow_request(kinds[i % 2], tag, terms=10))
        wait_until(lambda: queue_depth(services, handler.config["task_queue"]) == 0, 30, what="both tasks taken")
        victims = wait_until(lambda: len(busy_workers(workers, baseline)) == 2 and busy_workers(workers, baseline),
                             90, what="both feature workers computing")
        for victim in victims:
            victim.kill()
        killed = time.monotonic()
        answers = {kind: waiting.receive(kind, 180, waiting.clients[i::2]) for i, kind in enumerate(kinds)}
        print(f"\nworkers {[v.pid for v in victims]} SIGKILLed mid-task; {time.monotonic() - killed:.1f}s later "
              f"statuses: {({kind: [a['status'] for a in got] for kind, got in answers.items()})}")
        extra = {kind: waiting.extra_responses(kind, settle=0.5) for kind in kinds}
    for kind in kinds:  # the lock-free task first: a failure of the other does not hide its outcome
        got = answers[kind]
        assert [a["status"] for a in got] == [0] * 5, f"{kind}: {got[0]['detailed_info']}"
        assert len({str(a["result"]) for a in got}) == 1 and extra[kind] == 0
        assert handler.metric("qlib_server_tasks_redelivered_total", type=kind) == 1, kind
        assert handler.metric(PROCESSED, type=kind, status="0") == 1, kind
    assert sorted(answers["instrument"][0]["result"]) == all_codes(dataset)


def test_queued_tasks_survive_a_server_restart(start_server, services, dataset):
    first = start_server(modules=("request_handler",))
    days = trading_days(dataset)
    windows = [(days[7 * i], days[7 * i + 4]) for i in range(4)]
    tag = salt()
    features = [feature_body([f"Mean($close,{w})+{tag}"]) for w in (3, 4)]
    tasks = first.config["task_queue"]
    requests = [("calendar", calendar_body(*w)) for w in windows] + [("feature", body) for body in features]
    with crowd([first.url], len(requests)) as before:
        for client, (kind, body) in zip(before.clients, requests):
            client.send(kind, body)
        wait_until(lambda: (queue_depth(services, light_queue(tasks)), queue_depth(services, tasks)) == (4, 2), 30,
                   what="6 tasks queued")
    first.stop()  # the whole server goes away with 6 tasks queued and no processor
    assert (queue_depth(services, light_queue(tasks)), queue_depth(services, tasks)) == (4, 2)

    second = start_server()
    wait_until(lambda: second.metric(PROCESSED, type="calendar", status="0") == 4
               and second.metric(PROCESSED, type="feature", status="0") == 2, 90, what="the 6 queued tasks processed")
    assert (queue_depth(services, light_queue(tasks)), queue_depth(services, tasks)) == (0, 0)
    assert queue_depth(services, second.config["message_queue"]) == 0
    with WireClient(second.url) as client:
        assert window(client.request("calendar", calendar_body(*windows[0]))) == days[0:5]
        assert client.request("feature", features[0])["status"] == 0


def test_poison_task_is_dead_lettered_while_small_requests_keep_flowing(start_server, services, dataset):
    server = start_server(task_timeout=2, max_deliveries=2)
    days = trading_days(dataset)
    wait_until(lambda: workers_consuming(services, server.config), 90, what="every worker consuming")
    latencies, statuses = [], []
    with WireClient(server.url) as poisoned, WireClient(server.url) as small:
        sent = time.monotonic()
        poisoned.send("instrument", slow_instrument_body(16, salt()))
        i = 0
        while poisoned.responses["instrument"].empty() and time.monotonic() - sent < 120:
            started = time.monotonic()
            answer = small.request("calendar", calendar_body(days[i % 700], days[i % 700 + 3]), timeout=60)
            latencies.append(time.monotonic() - started)
            statuses.append(answer["status"])
            i += 1
        answer = poisoned.receive("instrument", 60)
        print(f"\npoison task answered after {time.monotonic() - sent:.1f}s: {answer}")
        print(f"meanwhile {len(latencies)} calendar requests: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
        assert answer["status"] == 2 and "dead-lettered" in answer["detailed_info"]
        assert statuses == [0] * len(statuses)
    assert server.metric("qlib_server_tasks_dead_lettered_total", type="instrument") == 1
    assert server.metric(PROCESSED, type="instrument", status="2") == 1
    assert queue_depth(services, server.config["task_queue"] + ".dead") == 0


def test_results_taken_by_a_responder_that_dies_reach_their_clients(start_server, services, dataset):
    """Handler A reaches Redis through a proxy that is stalled, so A's responder hangs inside the
    answer of the first result RabbitMQ hands it (and holds the next ones unacknowledged); then A is
    SIGKILLed: every one of those results must reach handler B, whose clients wait for them."""
    shared_sockets = f"redis://{services.redis_host}:{services.redis_port}/0"
    days = trading_days(dataset)
    windows = [(days[11 * i], days[11 * i + 2]) for i in range(10)]
    with proxy_to(services.redis_host, services.redis_port) as redis_of_a:
        a = start_server(modules=("request_handler",), socketio_message_queue=shared_sockets,
                         redis_port=redis_of_a.port, wait=False)
        b = start_server(modules=("request_handler",), socketio_message_queue=shared_sockets, wait=False)
        processor = start_server(modules=("data_processor",), wait=False)
        wait_until(lambda: a.ready() and b.ready(), 90, what="both handlers ready")
        wait_until(lambda: workers_consuming(services, processor.config), 90, what="every worker consuming")
        tasks = light_queue(a.config["task_queue"])
        try:
            with redis_of_a.stalled(), crowd([b.url], len(windows)) as waiting:
                waiting.send("calendar", [calendar_body(*w) for w in windows])
                wait_until(lambda: queue_depth(services, tasks) == 0, 60, what="every task taken")
                time.sleep(2.0)  # let the results reach both responders: A's hang, nothing to observe there
                held_by_a = len(windows) - sum(not c.responses["calendar"].empty() for c in waiting.clients)
                print(f"\n{held_by_a} of {len(windows)} results held by handler A, stuck on Redis")
                assert held_by_a > 0, "handler A took no result: nothing was tested"
                os.kill(a.proc.pid, signal.SIGKILL)
                killed = time.monotonic()
                answers = waiting.receive("calendar", 60)
                print(f"all answered through handler B {time.monotonic() - killed:.1f}s after A was killed")
                for answer, w in zip(answers, windows):
                    assert answer["status"] == 0 and window(answer) == days[days.index(w[0]):days.index(w[1]) + 1]
                assert waiting.extra_responses("calendar") == 0
        finally:
            if a.proc.poll() is None:
                os.kill(a.proc.pid, signal.SIGKILL)
                a.proc.wait(10)
