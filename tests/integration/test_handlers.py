"""Several request handlers on one RabbitMQ and Redis, configured with the original keys only: a
client is answered whichever handler took the result of its task."""

from __future__ import annotations

import time

from conftest import wait_until
from faults import consumers, crowd, feature_body, metric_sum, salt, slow_terms

PER_HANDLER = 60
PUBLISHED, PROCESSED, FORWARDED = ("qlib_server_tasks_published_total", "qlib_server_tasks_processed_total",
                                   "qlib_server_answers_forwarded_total")


def test_clients_of_every_handler_are_answered_when_they_share_one_cold_task(start_server, services):
    handlers = [start_server(modules=("request_handler",), wait=False) for _ in range(2)]
    processors = [start_server(modules=("data_processor",), wait=False) for _ in range(2)]
    wait_until(lambda: all(h.ready() for h in handlers), 120, what="both handlers ready")
    tasks = processors[0].config["task_queue"]
    wait_until(lambda: consumers(services, tasks) == 4, 120, what="the 4 feature workers of 2 processors consuming")
    same = feature_body(slow_terms(4, salt()))
    with crowd([h.url for h in handlers], 2 * PER_HANDLER) as clients:
        sent = time.monotonic()
        clients.send("feature", [same] * len(clients))
        answers = clients.receive("feature", 120)
        seconds = time.monotonic() - sent
        by_handler = [[a["status"] for a in answers[i::2]] for i in range(2)]
        print(f"\n{PER_HANDLER} clients on each of 2 handlers, one cold feature set: all answered in {seconds:.1f}s; "
              f"tasks published per handler {[h.metric(PUBLISHED, type='feature') for h in handlers]}, "
              f"results taken per handler {[h.metric(PROCESSED, type='feature', status='0') for h in handlers]}, "
              f"answers forwarded per handler {[h.metric(FORWARDED) for h in handlers]}")
        assert by_handler == [[0] * PER_HANDLER] * 2, {a["detailed_info"] for a in answers}
        assert len({a["result"] for a in answers}) == 1
        assert clients.extra_responses("feature") == 0
    assert metric_sum(handlers, PUBLISHED, type="feature") == 1
    assert metric_sum(handlers, PROCESSED, type="feature", status="0") == 1
    assert metric_sum(handlers, FORWARDED) == PER_HANDLER, "the other handler's clients went through its inbox"
