"""Lost connections: clients that leave early, RabbitMQ and Redis restarted under load, and every
server connection cut through a proxy. Every request in flight gets exactly one answer (a result or
an error, never silence), and the server serves again afterwards.

Tests that restart the session's containers leave them running and answering (``containers_restored``).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from clients import WireClient
from conftest import wait_until
from faults import (
    CalendarLoad,
    calendar_body,
    containers_restored,
    crowd,
    feature_body,
    proxy_to,
    salt,
    trading_days,
    workers_consuming,
)

from qlib_server.broker.rabbitmq import RabbitMQBroker
from qlib_server.errors import ConnectionLost

PROCESSED = "qlib_server_tasks_processed_total"


def serves_again(server, days, timeout: float = 120.0) -> float:
    """Wait until a new client gets a good answer; return how long that took."""
    started = time.monotonic()

    def good_answer() -> bool:
        with WireClient(server.url) as client:
            answer = client.request("calendar", calendar_body(days[1], days[3]), timeout=10)
            return answer["status"] == 0 and len(answer["result"]) == 3

    wait_until(good_answer, timeout, interval=1.0, what="a good answer after the fault")
    return time.monotonic() - started


def reconnects(server) -> str:
    return ", ".join(f"{service}={server.metric('qlib_server_reconnects_total', service=service):g}"
                     for service in ("rabbitmq", "redis"))


def check_load(load: CalendarLoad, fault: str) -> None:
    extra = load.stop()
    print(f"\n{fault}: {load.summary()}, {extra} extra")
    assert load.records, "the load sent nothing"
    assert not load.silent, f"requests left without any answer: {load.silent}"
    assert not [r for r in load.records if r["wrong"]], "a client got the answer to another request"
    assert extra == 0, "a request was answered twice"


def test_a_client_leaving_before_its_answer_disturbs_nobody(start_server, services, dataset):
    handler = start_server(modules=("request_handler",))
    days = trading_days(dataset)
    body = feature_body([f"Mean($close,7)+{salt()}"])
    lone_body = calendar_body(days[40], days[44])
    leaver, lone = WireClient(handler.url), WireClient(handler.url)
    with crowd([handler.url], 5) as stayers:
        leaver.send("feature", body)  # the first waiter: it published the task
        wait_until(lambda: handler.metric("qlib_server_tasks_published_total", type="feature") == 1, 30)
        stayers.send("feature", [body] * 5)
        lone.send("calendar", lone_body)  # the only waiter of its task
        wait_until(lambda: handler.metric("qlib_server_dedup_hits_total", type="feature") == 5, 30)
        leaver.close()
        lone.close()
        wait_until(lambda: handler.metric("qlib_server_connected_clients") == 5, 30, what="two clients gone")

        processor = start_server(modules=("data_processor",), wait=False)
        answers = stayers.receive("feature", 120)
        assert [a["status"] for a in answers] == [0] * 5
        assert stayers.extra_responses("feature") == 0
    wait_until(lambda: handler.metric(PROCESSED, type="calendar", status="0") == 1, 60, what="the lone task done")
    wait_until(lambda: workers_consuming(services, processor.config), 60)
    assert handler.ready()
    with WireClient(handler.url) as newcomer:
        assert newcomer.request("calendar", lone_body)["status"] == 0
        assert newcomer.request("feature", body)["status"] == 0


def test_rabbitmq_restart_mid_load_leaves_no_request_unanswered(start_server, services, dataset):
    server = start_server(request_timeout=20, result_cache_ttl=0)
    days = trading_days(dataset)
    with containers_restored(services):
        load = CalendarLoad(server.url, days, clients=6, timeout=40)
        try:
            wait_until(lambda: len(load.records) >= 20, 60, what="load running")
            started = time.monotonic()
            services.rabbitmq.get_wrapped_container().restart()
            print(f"\nRabbitMQ restarted in {time.monotonic() - started:.1f}s")
            wait_until(lambda: [r for r in load.records if r["sent"] > started + 1 and r["status"] == 0], 120,
                       what="answers again under load")
        finally:
            check_load(load, "RabbitMQ restart")
    print(f"new client served {serves_again(server, days):.1f}s later; reconnects: {reconnects(server)}")


def test_redis_paused_then_restarted_mid_load_leaves_no_request_unanswered(start_server, services, dataset):
    server = start_server(request_timeout=8, result_cache_ttl=0)
    days = trading_days(dataset)
    redis_container = services.redis.get_wrapped_container()
    with containers_restored(services):
        load = CalendarLoad(server.url, days, clients=6, timeout=30)
        try:
            wait_until(lambda: len(load.records) >= 20, 60, what="load running")
            paused = time.monotonic()
            redis_container.pause()
            time.sleep(4.0)  # the outage itself
            redis_container.unpause()
            wait_until(lambda: [r for r in load.records if r["sent"] > paused + 4 and r["status"] == 0], 120,
                       what="answers again after the pause")
            started = time.monotonic()
            redis_container.restart()
            print(f"\nRedis paused 4s, then restarted (its data lost) in {time.monotonic() - started:.1f}s")
            wait_until(lambda: [r for r in load.records if r["sent"] > started + 1 and r["status"] == 0], 120,
                       what="answers again after the restart")
        finally:
            check_load(load, "Redis pause and restart")
    print(f"new client served {serves_again(server, days):.1f}s later; reconnects: {reconnects(server)}")


def test_connections_cut_mid_load_are_reopened(start_server, services, dataset):
    days = trading_days(dataset)
    with proxy_to(services.amqp_host, services.amqp_port) as rabbit, \
            proxy_to(services.redis_host, services.redis_port) as red:
        server = start_server(queue_port=rabbit.port, redis_port=red.port, request_timeout=15, result_cache_ttl=0)
        load = CalendarLoad(server.url, days, clients=6, timeout=40)
        try:
            for name, proxy in (("RabbitMQ", rabbit), ("Redis", red)):
                wait_until(lambda: len(load.records) >= 10, 60, what="load running")
                cut_at, cut = time.monotonic(), proxy.cut()
                print(f"\ncut {cut} {name} connections")
                wait_until(lambda cut_at=cut_at: [r for r in load.records
                                                  if r["sent"] > cut_at + 0.5 and r["status"] == 0],
                           90, what=f"answers again after the {name} cut")
            with rabbit.down() as cut_rabbit, red.down() as cut_redis:
                print(f"both services unreachable for 3s ({cut_rabbit}+{cut_redis} connections cut)")
                time.sleep(3.0)  # the outage itself
            back = time.monotonic()
            wait_until(lambda: [r for r in load.records if r["sent"] > back and r["status"] == 0], 90,
                       what="answers again after the outage")
        finally:
            check_load(load, "connections cut")
        print(f"new client served {serves_again(server, days):.1f}s later; reconnects: {reconnects(server)}; "
              f"connections through the proxies: RabbitMQ {rabbit.accepted}, Redis {red.accepted}")
        server.stop()  # while its services are still reachable


def test_a_connection_reset_while_opening_is_reported_as_connection_lost(services):
    """pika's errors never leave the broker: connections the network accepts and then resets (what a
    port proxy does while RabbitMQ restarts) fail as ConnectionLost, whatever pika raises. Eight
    threads try at once, so that some resets land while pika is still setting the socket up."""
    def attempts(port: int) -> Counter:
        broker, outcomes = RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{port}/%2F", retries=0), Counter()
        for _ in range(30):
            try:
                broker.publish("nowhere", {"attempt": 1})
                outcomes["published"] += 1
            except ConnectionLost:
                outcomes["ConnectionLost"] += 1
            except Exception as exc:  # what the caller would not expect
                outcomes[type(exc).__name__] += 1
        return outcomes

    with proxy_to(services.amqp_host, services.amqp_port) as rabbit, rabbit.down():
        with ThreadPoolExecutor(8) as pool:
            outcomes = sum(pool.map(attempts, [rabbit.port] * 8), Counter())
    print(f"\n240 connection attempts reset by the network: {dict(outcomes)}")
    assert outcomes == {"ConnectionLost": 240}
