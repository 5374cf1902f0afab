"""De-duplication: identical requests in flight share one task; distinct requests never do.

Tasks are kept in flight by starting the data processor only after every request has been sent
(``start_server(modules=...)`` servers of one test share their queues and Redis database).
"""

from __future__ import annotations

import pandas as pd
from clients import WireClient
from conftest import wait_until
from faults import calendar_body, crowd, feature_body, metric_sum, queue_depth, salt, trading_days

from qlib_server.broker.base import light_queue

CROWD = 200
PUBLISHED, DEDUP, PROCESSED = ("qlib_server_tasks_published_total", "qlib_server_dedup_hits_total",
                               "qlib_server_tasks_processed_total")


def settle(handlers, kinds, total: int, *crowds) -> None:
    """With no data processor running, wait until each of ``total`` requests joined a waiting list;
    fail at once if any client got an answer instead (which could only be an error)."""
    def registered():
        return sum(h.metric(PUBLISHED, type=k) + h.metric(DEDUP, type=k) for h in handlers for k in kinds)

    def early():
        return [a for c in crowds for k in kinds for a in c.early(k)]

    wait_until(lambda: registered() == total or early(), 60, what=f"{total} requests registered")
    answered = early()
    assert not answered, (f"{len(answered)} of {total} requests answered before any task ran, e.g. "
                          f"{answered[0]['detailed_info']!r}; {registered():g} joined a waiting list")


def window(answer: dict) -> list[str]:
    return [pd.Timestamp(day).strftime("%Y-%m-%d") for day in answer["result"]]


def cold_feature(tag: int) -> dict:
    """A feature request no earlier test has put in Qlib's dataset cache."""
    return feature_body([f"Mean($close,5)+{tag}", f"Std($volume,10)+{tag}", f"$high-$low+{tag}"])


def dataset_cache_files(dataset, name: str) -> list:
    return [p for p in (dataset / "dataset_cache").rglob(name) if p.is_file()]


def test_identical_requests_in_flight_are_computed_once_and_distinct_ones_never_merged(start_server, services, dataset):
    handler = start_server(modules=("request_handler",))
    days = trading_days(dataset)
    windows = [(days[10 * i], days[10 * i + 3 + i % 4]) for i in range(30)]
    same = cold_feature(salt())
    with crowd([handler.url], CROWD) as identical, crowd([handler.url], 3 * len(windows)) as distinct:
        identical.send("feature", [same] * CROWD)
        distinct.send("calendar", [calendar_body(*windows[i % len(windows)]) for i in range(len(distinct))])
        settle([handler], ("feature", "calendar"), CROWD + len(distinct), identical, distinct)
        published = {t: handler.metric(PUBLISHED, type=t) for t in ("feature", "calendar")}
        print(f"\n{CROWD} identical feature requests -> {published['feature']:g} task(s); "
              f"{len(distinct)} calendar requests over {len(windows)} windows -> {published['calendar']:g} tasks")
        assert published == {"feature": 1, "calendar": len(windows)}
        tasks = handler.config["task_queue"]
        assert (queue_depth(services, tasks), queue_depth(services, light_queue(tasks))) == (1, len(windows))

        start_server(modules=("data_processor",), wait=False)
        answers = identical.receive("feature", 120)
        assert [a["status"] for a in answers] == [0] * CROWD, {a["detailed_info"] for a in answers}
        uris = {a["result"] for a in answers}
        assert len(uris) == 1 and dataset_cache_files(dataset, uris.pop()), "one dataset cache file for everyone"

        calendars = distinct.receive("calendar", 60)
        for i, answer in enumerate(calendars):
            start, end = windows[i % len(windows)]
            assert answer["status"] == 0, answer
            assert window(answer) == days[days.index(start):days.index(end) + 1], f"client {i} got another window"
        assert identical.extra_responses("feature") + distinct.extra_responses("calendar", settle=0) == 0
    assert handler.metric(PROCESSED, type="feature", status="0") == 1
    assert handler.metric(PROCESSED, type="calendar", status="0") == len(windows)


def test_identical_requests_spread_over_two_handlers_are_computed_once(start_server, services, dataset):
    """Two request handlers share Redis and RabbitMQ: identical requests reaching both still make one
    task, and the clients of both are answered."""
    handlers = [start_server(modules=("request_handler",), wait=False) for _ in range(2)]
    wait_until(lambda: all(h.ready(processors=False) for h in handlers), 90, what="both handlers up")
    same = cold_feature(salt())
    with crowd([h.url for h in handlers], CROWD) as identical:
        identical.send("feature", [same] * CROWD)
        settle(handlers, ("feature",), CROWD, identical)
        per_handler = [h.metric(PUBLISHED, type="feature") for h in handlers]
        print(f"\n{CROWD} identical requests over 2 handlers -> tasks published per handler: {per_handler}")
        assert sum(per_handler) == 1

        start_server(modules=("data_processor",), wait=False)
        answers = identical.receive("feature", 120)
        assert [a["status"] for a in answers] == [0] * CROWD, {a["detailed_info"] for a in answers}
        assert len({a["result"] for a in answers}) == 1
        assert identical.extra_responses("feature") == 0
    assert metric_sum(handlers, PROCESSED, type="feature", status="0") == 1


def test_a_client_stays_served_when_another_handler_delivers_its_answers(start_server, services, dataset):
    """Either handler consumes each result and forwards the answers of the other's clients: a client of
    handler B must stay served however many of its answers handler A took."""
    handlers = [start_server(modules=("request_handler",), wait=False) for _ in range(2)]
    start_server(modules=("data_processor",), wait=False)
    wait_until(lambda: all(h.ready() for h in handlers), 90, what="both handlers ready")
    days = trading_days(dataset)
    with WireClient(handlers[1].url) as client:
        for i in range(24):
            answer = client.request("calendar", calendar_body(days[5 * i], days[5 * i + 2]), timeout=60)
            via = [h.metric(PROCESSED, type="calendar", status="0") for h in handlers]
            assert answer["status"] == 0, (f"request {i} of a client of handler B refused after {i} answers, "
                                           f"{via[0]:g} of them delivered by handler A: {answer['detailed_info']}")
            assert window(answer) == days[5 * i:5 * i + 3]
    print(f"\n24 sequential requests on handler B: results consumed by handler A/B = {via[0]:g}/{via[1]:g}")
