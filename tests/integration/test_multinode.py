"""Scale-out: two request handlers and two data processors, each its own process, sharing RabbitMQ and
Redis, configured with the original keys only. Either handler may take a result; it forwards the
answers of the other's clients to that handler's inbox. Processors compete for the tasks.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest
from clients import WireClient, local_qlib
from conftest import wait_until
from faults import slow_terms
from qlib.data.cache import DiskDatasetCache

pytestmark = pytest.mark.integration

PUBLISHED = "qlib_server_tasks_published_total"
FIELD_SETS = [["$close", "Mean($close, 5)"], ["$volume", "Std($volume, 10)"], ["$high - $low", "Ref($close, 2)"],
              ["$open / $close", "Max($high, 20)"]]
MARKETS = ["csi300", "csi100", "all"]
LOCAL_SCRIPT = f"""
FIELD_SETS, MARKETS = {FIELD_SETS!r}, {MARKETS!r}
result = {{
    "calendar": [str(t) for t in D.calendar()],
    "lists": {{m: D.list_instruments(D.instruments(m), as_list=True) for m in MARKETS}},
    "features": [D.features(D.instruments("csi300"), fields) for fields in FIELD_SETS],
}}
"""


def slow_fields(tag: int, terms: int = 3) -> list[str]:
    """Fields no other request asks for (``tag``), slow to compute (:func:`faults.slow_terms`), so a task
    stays in flight while a crowd arrives."""
    return slow_terms(terms, tag)


def feature_body(fields: list[str], market: str = "csi300", disk_cache: int = 1) -> dict:
    return {"instruments": {"market": market, "filter_pipe": []}, "fields": fields, "start_time": None,
            "end_time": None, "freq": "day", "disk_cache": disk_cache}


def read_cache(dataset: Path, uri: str, fields: list[str]) -> pd.DataFrame:
    return DiskDatasetCache.read_data_from_cache(dataset / "dataset_cache" / uri, None, None, fields)


def connect_all(urls: list[str], n: int) -> list[WireClient]:
    """``n`` clients, spread round-robin over ``urls``."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: WireClient(urls[i % len(urls)]), range(n)))


def close_all(clients: list[WireClient]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(WireClient.close, clients))


@pytest.fixture(scope="module")
def local(dataset) -> dict:
    return local_qlib(LOCAL_SCRIPT, dataset)


@pytest.fixture
def handlers(start_server, services):
    """Two request handlers on the same RabbitMQ and Redis."""
    started = [start_server(modules=("request_handler",), wait=False) for _ in range(2)]
    # ready but for the processors, which each test starts when it wants them
    wait_until(lambda: all(h.ready(processors=False) for h in started)
               or any(h.proc.poll() is not None for h in started), 120, what="both handlers ready")
    for h in started:
        assert h.ready(processors=False), f"handler not ready:\n{h.log()[-3000:]}"
    return started


def start_processor(start_server):
    return start_server(modules=("data_processor",), wait=False, max_process=1, light_workers=1)


def processor_warm(processor) -> bool:
    """Whether every worker process of a processor (one feature, one light) has initialised Qlib."""
    assert processor.proc.poll() is None, processor.log()[-3000:]
    return processor.log().count("qlib successfully initialized") >= 2


def test_one_request_sent_to_both_handlers_makes_one_task_and_every_client_is_answered(start_server, handlers):
    for _ in range(2):
        start_processor(start_server)
    clients = connect_all([h.url for h in handlers], 30)
    try:
        body = feature_body(slow_fields(random.randrange(10**6)), market="all")
        for client in clients:
            client.send("feature", body)
        answers = [client.receive("feature", 120) for client in clients]
    finally:
        close_all(clients)
    assert [a["status"] for a in answers] == [0] * len(clients), {a["detailed_info"] for a in answers}
    assert len({a["result"] for a in answers}) == 1, "every client gets the same dataset cache"
    per_handler = [h.metric(PUBLISHED, type="feature") for h in handlers]
    received = [h.metric("qlib_server_requests_total", type="feature") for h in handlers]
    print(f"\n30 identical requests over 2 handlers (received {received}) -> tasks published per handler {per_handler}")
    assert received == [15, 15]
    assert sum(per_handler) == 1


def test_distinct_requests_spread_over_both_handlers_are_all_answered_correctly(start_server, handlers, local,
                                                                               dataset):
    for _ in range(2):
        start_processor(start_server)
    calendar = local["calendar"]
    clients = connect_all([h.url for h in handlers], 8)

    def session(i: int) -> list[str]:
        """One client's requests, one at a time; returns what went wrong."""
        client, wrong = clients[i], []
        for j in range(4):
            a, b = 40 * i + 7 * j, 40 * i + 7 * j + 3 + j
            answer = client.request("calendar", {"start_time": calendar[a], "end_time": calendar[b]}, timeout=90)
            if answer != {"result": calendar[a:b + 1], "status": 0, "detailed_info": None}:
                wrong.append(f"client {i} calendar {j}: {answer}")
        market = MARKETS[i % len(MARKETS)]
        answer = client.request("instrument", {"instruments": {"market": market, "filter_pipe": []}, "as_list": True},
                                timeout=90)
        if answer != {"result": local["lists"][market], "status": 0, "detailed_info": None}:
            wrong.append(f"client {i} instruments {market}: {answer}")
        k = i % len(FIELD_SETS)
        answer = client.request("feature", feature_body(FIELD_SETS[k]), timeout=90)
        if answer["status"] != 0:
            wrong.append(f"client {i} features {k}: {answer}")
        else:
            served, expected = read_cache(dataset, answer["result"], FIELD_SETS[k]), local["features"][k]
            try:
                pdt.assert_frame_equal(served[FIELD_SETS[k]].sort_index(), expected[FIELD_SETS[k]].sort_index(),
                                       check_freq=False)
            except AssertionError as exc:
                wrong.append(f"client {i} features {k}: {exc}")
        return wrong

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            wrong = [w for ws in pool.map(session, range(len(clients))) for w in ws]
    finally:
        close_all(clients)
    assert not wrong, "\n".join(wrong[:10])
    published = {t: [h.metric(PUBLISHED, type=t) for h in handlers] for t in ("calendar", "instrument", "feature")}
    received = {t: [h.metric("qlib_server_requests_total", type=t) for h in handlers] for t in published}
    print(f"\nrequests per handler: {received}; tasks published per handler: {published}")
    assert all(min(counts) > 0 for counts in received.values()), "both handlers took requests of each type"
    assert sum(published["calendar"]) == 4 * len(clients)


def run_batch(urls: list[str], tags: list[int]) -> float:
    """Send one distinct cold feature request per tag, all at once; return seconds until all are answered."""
    clients = connect_all(urls, len(tags))
    try:
        started = time.perf_counter()
        for client, tag in zip(clients, tags):
            client.send("feature", feature_body(slow_fields(tag, terms=2)))
        answers = [client.receive("feature", 180) for client in clients]
        seconds = time.perf_counter() - started
    finally:
        close_all(clients)
    assert [a["status"] for a in answers] == [0] * len(tags), {a["detailed_info"] for a in answers}
    return seconds


def test_a_second_data_processor_shares_the_work(start_server):
    """Throughput of a batch of distinct cold feature requests with one, then two, processors of one
    worker each (printed, not asserted: the machine is shared)."""
    handler = start_server(modules=("request_handler",))
    urls, batch = [handler.url], 8
    first = start_processor(start_server)
    wait_until(lambda: processor_warm(first), 90, what="first processor ready")
    base = random.randrange(10**6)
    one = run_batch(urls, [base + i for i in range(batch)])
    second = start_processor(start_server)
    wait_until(lambda: processor_warm(second), 90, what="second processor ready")
    two = run_batch(urls, [base + batch + i for i in range(batch)])
    print(f"\n{batch} distinct cold feature requests: 1 processor {one:.2f}s ({batch / one:.2f} req/s), "
          f"2 processors {two:.2f}s ({batch / two:.2f} req/s), speed-up x{one / two:.2f}")
    assert handler.metric(PUBLISHED, type="feature") == 2 * batch
    assert handler.metric("qlib_server_tasks_processed_total", type="feature", status="0") == 2 * batch
