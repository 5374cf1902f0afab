"""Prometheus counters of one request handler (served at ``GET /metrics``) and of one data processor
(served on ``processor_metrics_port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The counters the handler keeps; each handler has its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qlib_server_requests", "Requests received", ["type"], registry=r)
        self.responses = Counter("qlib_server_responses", "Responses emitted", ["type", "status"], registry=r)
        self.tasks_published = Counter("qlib_server_tasks_published", "Tasks published", ["type"], registry=r)
        self.tasks_processed = Counter("qlib_server_tasks_processed", "Task results received", ["type", "status"],
                                       registry=r)
        self.tasks_redelivered = Counter("qlib_server_tasks_redelivered", "Results of tasks delivered more than once",
                                         ["type"], registry=r)
        self.tasks_dead_lettered = Counter("qlib_server_tasks_dead_lettered", "Tasks given up after max_deliveries",
                                           ["type"], registry=r)
        self.cache_hits = Counter("qlib_server_cache_hits", "Requests answered from the result cache", ["type"],
                                  registry=r)
        self.dedup_hits = Counter("qlib_server_dedup_hits", "Requests joined to a task in flight", ["type"], registry=r)
        self.request_timeouts = Counter("qlib_server_request_timeouts", "Requests answered by timeout", ["type"],
                                        registry=r)
        self.answers_forwarded = Counter("qlib_server_answers_forwarded",
                                         "Answers sent to the handler holding the client", registry=r)
        self.requests_recovered = Counter("qlib_server_requests_recovered",
                                          "Requests served again after their waiter entry vanished", ["type"],
                                          registry=r)
        self.refused_connections = Counter("qlib_server_refused_connections", "Connections refused", registry=r)
        self.reconnects = Counter("qlib_server_reconnects", "Reconnections to a service", ["service"], registry=r)
        self.errors = Counter("qlib_server_errors", "Errors logged by this process", registry=r)
        self.queue_messages = Gauge("qlib_server_queue_messages",
                                    "Messages ready in a task queue (sampled each second)",
                                    ["queue"], registry=r)
        self.connected = Gauge("qlib_server_connected_clients", "Connected Socket.IO clients", registry=r)
        self.pending = Gauge("qlib_server_requests_pending", "Requests waiting for their answer", registry=r)
        self.latency = Histogram("qlib_server_request_seconds", "Request to response", ["type"], registry=r,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                          30, 60))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ProcessorMetrics:
    """The counters a data processor's supervisor keeps about its workers and their tasks."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.task_seconds = Histogram("qlib_server_processor_task_seconds", "Computation of one task", ["type"],
                                      registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                           30, 60, 300, 600))
        self.tasks = Counter("qlib_server_processor_tasks", "Tasks ended, by outcome (ok, refused, failed, "
                             "timed_out, worker_died)", ["type", "outcome"], registry=r)
        self.engine_fallbacks = Counter("qlib_server_processor_engine_fallbacks",
                                        "Fields (per block of instruments) the compute engine left to Qlib",
                                        registry=r)
        self.redeliveries = Counter("qlib_server_processor_redeliveries", "Tasks taken that had been delivered before",
                                    ["type"], registry=r)
        self.dead_letters = Counter("qlib_server_processor_dead_letters", "Dead-lettered tasks answered with an error",
                                    ["type"], registry=r)
        self.worker_restarts = Counter("qlib_server_processor_worker_restarts", "Workers started again after dying "
                                       "or being killed", registry=r)
        self.workers = Gauge("qlib_server_processor_workers", "Worker processes", ["lane"], registry=r)
        self.busy_workers = Gauge("qlib_server_processor_busy_workers", "Workers computing a task now", ["lane"],
                                  registry=r)
        self.busy_seconds = Gauge("qlib_server_processor_worker_busy_seconds", "How long each worker has been "
                                  "computing its task (0: idle)", ["worker"], registry=r)
        self.errors = Counter("qlib_server_errors", "Errors logged by this process", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of ``registry`` as ``{'name{label="value",...}': value}``, labels in alphabetical
    order (the names the status page gives its figures); ``_created`` timestamps left out."""
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
