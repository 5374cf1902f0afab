"""The status page in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
on ``GET /`` of a handler of a fleet of two handlers and two processors on real RabbitMQ and Redis;
real clients move its figures, which must reach the right values within a few seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pika
import pytest
import requests
from clients import WireClient
from conftest import ROOT, free_port, wait_until
from faults import calendar_body, feature_body, salt, slow_instrument_body

from qlib_server.broker.base import dead_letter_queue, light_queue

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = ROOT / "bench-results"
#: seconds a figure may take to follow what the clients did ("within a few seconds")
FOLLOWS_WITHIN = 10.0
TOKEN = "s3cret-status-token"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


class StatusPage:
    """One browser tab on a handler's status page, and what its figures say."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.goto(url)
        wait_until(lambda: self.tab.locator("#state").text_content() == "live", 20, what="the page live")

    def figure(self, metric: str) -> Optional[float]:
        """The number the figure ``data-metric=metric`` shows, None when there is none or it is blank."""
        element = self.tab.locator(f"[data-metric='{metric}']")
        if element.count() == 0:
            return None
        value = element.first.get_attribute("data-value")
        return float(value) if value not in (None, "") else None

    def follows(self, metric: str, expected, what: str, within: float = FOLLOWS_WITHIN) -> float:
        """Wait until the figure ``metric`` equals ``expected`` (or satisfies it, when callable); return
        how many seconds that took."""
        started = time.monotonic()
        check = expected if callable(expected) else (lambda value: value == expected)
        try:
            wait_until(lambda: (lambda v: v is not None and check(v))(self.figure(metric)), within, 0.1, what=what)
        except AssertionError:
            raise AssertionError(f"{what}: {metric} shows {self.figure(metric)!r} after {within}s, "
                                 f"expected {expected!r}") from None
        return time.monotonic() - started

    def text(self, selector: str) -> str:
        return self.tab.locator(selector).inner_text()

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / name
        self.tab.screenshot(path=str(path), full_page=True)
        print(f"\nscreenshot of the status page: {path}")
        return path


def prometheus(url: str, **kwargs) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    reply = requests.get(url, timeout=5, **kwargs)
    reply.raise_for_status()
    out = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_the_status_page_follows_clients_requests_a_slow_task_and_a_dead_letter_across_the_fleet(
        start_server, browser):
    # Every task may run 4 s and is tried twice: the slow instrument filter below is dead-lettered.
    fleet = {"task_timeout": 4, "max_deliveries": 2, "max_process": 1}
    first = start_server(modules=("request_handler",), **fleet)
    second = start_server(modules=("request_handler",), **fleet)
    processors = [start_server(modules=("data_processor",), wait=False, processor_metrics_port=free_port(), **fleet)
                  for _ in range(2)]
    wait_until(lambda: first.ready(), 120, what="both task lanes consumed")
    page = StatusPage(browser, first.url + "/")
    page.follows("count(qlib_server_connected_clients)", 2, "two handlers on the page")
    page.follows("count(qlib_server_processor_worker_restarts_total)", 2, "two processors on the page", 60)
    page.follows('qlib_server_processor_workers{lane="main"}', 2, "a feature worker per processor")
    page.follows('qlib_server_processor_workers{lane="light"}', 2, "a light worker per processor")
    delays = {}

    clients = [WireClient(first.url) for _ in range(3)] + [WireClient(second.url) for _ in range(2)]
    try:
        delays["connected clients"] = page.follows("qlib_server_connected_clients", 5, "5 connected clients")
        view = requests.get(f"{first.url}/status.json", timeout=5).json()
        node = {h["address"]: h["id"] for h in view["handlers"]}
        page.follows(f'qlib_server_connected_clients{{instance="{node[f"127.0.0.1:{first.port}"]}"}}', 3,
                     "3 clients on the first handler")
        page.follows(f'qlib_server_connected_clients{{instance="{node[f"127.0.0.1:{second.port}"]}"}}', 2,
                     "2 clients on the second handler")

        body = calendar_body("2019-01-02", "2019-01-31")
        for client in clients:  # one task, then four answers from the result cache
            assert client.request("calendar", body)["status"] == 0
        delays["requests"] = page.follows("sum(qlib_server_requests_total)", 5, "5 requests")
        page.follows('qlib_server_requests_total{type="calendar"}', 5, "5 calendar requests")
        page.follows('qlib_server_tasks_published_total{type="calendar"}', 1, "1 calendar task")
        page.follows('qlib_server_cache_hits_total{type="calendar"}', 4, "4 answers from the result cache")
        page.follows('qlib_server_request_seconds_count{type="calendar"}', 5, "5 calendar latencies")
        page.follows('qlib_server_processor_tasks_total{outcome="ok",type="calendar"}', 1, "1 calendar task computed")
        assert page.figure('sum(rate(qlib_server_requests_total[5s]))') > 0
        # A field the compute engine leaves to Qlib (a shifted boolean) is counted on the page.
        left_to_qlib = feature_body([f"Ref($close > $open, 1) + {salt()}", "$close"])
        assert clients[1].request("feature", left_to_qlib, timeout=120)["status"] == 0
        delays["fields left to Qlib"] = page.follows("sum(qlib_server_processor_engine_fallbacks_total)",
                                                     lambda n: n >= 1, "a field the engine left to Qlib")

        poisoned = clients[0]
        sent = time.monotonic()
        poisoned.send("instrument", slow_instrument_body(30, salt()))
        delays["task in flight"] = page.follows('qlib_server_processor_busy_workers{lane="main"}', 1,
                                                "the slow task computing")
        page.follows("sum(qlib_server_processor_busy_workers)", 1, "one task computing in the fleet")
        assert "instrument list of market all with 1 filter(s)" in page.text("#workers")
        busy_for = [page.figure(f'qlib_server_processor_worker_busy_seconds{{instance="{p["id"]}",worker="0"}}')
                    for p in requests.get(f"{first.url}/status.json", timeout=5).json()["processors"]]
        assert any(seconds is not None and seconds >= 0 for seconds in busy_for), busy_for
        page.screenshot("status-page-task-in-flight.png")

        answer = poisoned.receive("instrument", 120)
        print(f"\nthe slow task was dead-lettered after {time.monotonic() - sent:.1f}s: {answer['detailed_info']}")
        assert answer["status"] == 2 and "dead-lettered" in answer["detailed_info"]
        delays["dead letter"] = page.follows("sum(qlib_server_processor_dead_letters_total)", 1, "a dead letter")
        page.follows('qlib_server_processor_dead_letters_total{type="instrument"}', 1, "an instrument dead letter")
        page.follows('qlib_server_processor_tasks_total{outcome="timed_out",type="instrument"}', 2,
                     "both deliveries timed out")
        page.follows("sum(qlib_server_processor_redeliveries_total)", 1, "one redelivery")
        page.follows("qlib_server_processor_worker_restarts_total", 2, "the two killed workers replaced")
        page.follows("qlib_server_errors_total", lambda n: n >= 2, "the two timeouts logged as errors")
        assert "exceeded the 4s task limit" in page.text("[data-metric='qlib_server_errors_last_message']")
        page.follows("sum(qlib_server_processor_busy_workers)", 0, "no task computing any more")
        page.follows('histogram_quantile(0.5, qlib_server_request_seconds_bucket{type="instrument"})',
                     lambda s: s > 4, "the dead-lettered request's latency")

        # The page's processor figures are the sums of what each processor's metrics port says.
        view = requests.get(f"{first.url}/status.json", timeout=5).json()
        scraped = [prometheus(f"http://127.0.0.1:{p['metrics_port']}/metrics") for p in view["processors"]]
        assert len(scraped) == 2
        for sample in ('qlib_server_processor_tasks_total{outcome="timed_out",type="instrument"}',
                       'qlib_server_processor_dead_letters_total{type="instrument"}',
                       'qlib_server_processor_tasks_total{outcome="ok",type="calendar"}',
                       "qlib_server_processor_worker_restarts_total"):
            assert page.figure(sample) == sum(s.get(sample, 0.0) for s in scraped), sample
        assert sum(s.get('qlib_server_processor_task_seconds_count{type="calendar"}', 0) for s in scraped) == 1

        for client in clients[3:]:
            client.close()
        delays["disconnects"] = page.follows("qlib_server_connected_clients", 3, "3 clients after 2 left")
        page.screenshot("status-page.png")
    finally:
        for client in clients:
            client.close()

    processors[1].proc.send_signal(signal.SIGKILL)
    delays["a dead processor leaves"] = page.follows("count(qlib_server_processor_worker_restarts_total)", 1,
                                                     "the killed processor gone from the page", 30)
    print("\nseconds until the page showed it: " + ", ".join(f"{k} {v:.1f}" for k, v in delays.items()))
    assert page.errors == [], page.errors


def test_the_status_page_and_metrics_are_admitted_like_clients_and_health_probes_are_not(
        start_server, browser, services):
    handler = start_server(modules=("request_handler",), allowed_networks=["10.0.0.0/8"], auth_token=TOKEN)
    for path in ("/", "/status.json", "/status/events", "/metrics"):
        assert requests.get(handler.url + path, timeout=5).status_code == 403, path
        assert requests.get(handler.url + path, timeout=5, params={"token": "wrong"}).status_code == 403, path
    assert requests.get(handler.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).ok
    assert requests.get(handler.url + "/status.json", params={"token": TOKEN}, timeout=5).ok
    assert requests.get(handler.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(handler.url + "/readyz", timeout=5).status_code == 503  # no processor, as before

    page = StatusPage(browser, f"{handler.url}/?token={TOKEN}")  # the page passes the token to its events
    node = requests.get(handler.url + "/status.json", params={"token": TOKEN}, timeout=5).json()["node"]
    tasks = handler.config["task_queue"]
    with WireClient(handler.url, auth={"token": TOKEN}) as client:
        client.send("calendar", calendar_body("2019-02-01", "2019-02-28"))  # no processor: it waits in the lane
        page.follows('qlib_server_queue_messages{queue="light"}', 1, "the calendar task waiting in the light lane")
        page.follows(f'qlib_server_requests_pending{{instance="{node}"}}', 1, "the request pending on its handler")
    connection = pika.BlockingConnection(pika.URLParameters(services.amqp_url()))
    try:
        connection.channel().basic_publish("", dead_letter_queue(tasks), b'{"key": "k", "type": "calendar"}')
    finally:
        connection.close()
    page.follows('qlib_server_queue_messages{queue="dead"}', 1, "a message in the dead-letter queue")
    assert page.figure('qlib_server_queue_messages{queue="task_queue"}') == 0
    assert page.text("#lanes").count(light_queue(tasks)) == 1
    refused = prometheus(handler.url + "/metrics", params={"token": TOKEN})["qlib_server_refused_connections_total"]
    assert refused == 8  # each refused HTTP request above is counted like a refused connection
    assert page.errors == [], page.errors
