"""Fault injection and crowd helpers for the concurrency and fault-tolerance tests.

A :class:`TcpProxy` sits between a server and RabbitMQ or Redis and can cut, refuse or stall its
connections; a :class:`Crowd` is many wire clients sending at once; a :class:`CalendarLoad` keeps
clients busy through a fault; the rest finds worker processes, reads queue depths, keeps the session
containers healthy, drives the session registry from other processes, and builds slow requests.
"""

from __future__ import annotations

import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pika
import psutil
import redis
import redis_lock
from clients import WireClient

# -- requests ---------------------------------------------------------------------------------------


def calendar_body(start: str | None = None, end: str | None = None) -> dict:
    return {"start_time": start, "end_time": end, "freq": "day", "future": False}


def feature_body(fields: Sequence[str], market: str = "all", disk_cache: int = 1) -> dict:
    return {"instruments": {"market": market, "filter_pipe": []}, "fields": list(fields), "start_time": None,
            "end_time": None, "freq": "day", "disk_cache": disk_cache}


def salt() -> int:
    """A number that makes expressions unique to one test, so Qlib's dataset cache on disk is cold."""
    return random.randrange(1, 10**6)


#: a series the compute engine leaves to Qlib by design (a shifted boolean, which pandas makes an object series)
_LEFT_TO_QLIB = "(Ref($close > $open, 1) + $close)"


def slow_term(window: int, tag: int) -> str:
    """A field Qlib computes with two Python callbacks per row (rolling ``Mad`` and ``WMA`` over a series the
    engine leaves to Qlib): about 0.35 s of a worker's CPU over the session dataset, however fast the engine."""
    return f"Mad({_LEFT_TO_QLIB}, {window}) + WMA({_LEFT_TO_QLIB}, {window}) + {tag}"


def slow_terms(terms: int, tag: int) -> list[str]:
    """``terms`` slow fields (:func:`slow_term`): ``terms`` sets how long a task runs."""
    return [slow_term(window, tag) for window in range(5, 5 + terms)]


def slow_instrument_body(terms: int, tag: int) -> dict:
    """An instrument list filtered by a slow expression that keeps every instrument. The compute engine leaves
    the rule to Qlib (its rolling ``Mad`` terms are over a series the engine leaves to Qlib), without a
    dataset cache, so no cache lock is involved: each term runs a Python callback per row (~0.3 s a term over
    the session dataset)."""
    rule = "+".join(f"Mad({_LEFT_TO_QLIB},{window})+{tag}" for window in range(5, 5 + terms)) + ">0"
    return {"instruments": {"market": "all", "filter_pipe": [
        {"filter_type": "ExpressionDFilter", "rule_expression": rule, "keep": False}]},
        "start_time": None, "end_time": None, "freq": "day", "as_list": True}


def trading_days(dataset) -> list[str]:
    return (dataset / "calendars" / "day.txt").read_text().split()


# -- many clients -------------------------------------------------------------------------------------


class Crowd:
    """Wire clients connected in parallel, spread round-robin over ``urls``, closed together."""

    def __init__(self, urls: Sequence[str], size: int, threads: int = 16):
        with ThreadPoolExecutor(threads) as pool:
            self.clients: list[WireClient] = list(pool.map(lambda i: WireClient(urls[i % len(urls)]), range(size)))
        self.threads = threads

    def __len__(self) -> int:
        return len(self.clients)

    def send(self, kind: str, bodies: Sequence[Any]) -> None:
        """Client i sends ``bodies[i]``, all from ``threads`` threads in shuffled order."""
        order = list(zip(self.clients, bodies))
        random.shuffle(order)
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda pair: pair[0].send(kind, pair[1]), order))

    def receive(self, kind: str, timeout: float, clients: Sequence[WireClient] | None = None) -> list[dict]:
        """One response per client (in client order); fail naming how many stayed silent."""
        deadline = time.monotonic() + timeout
        answers, silent = [], 0
        for client in clients if clients is not None else self.clients:
            try:
                answers.append(client.receive(kind, max(0.01, deadline - time.monotonic())))
            except Exception:
                answers.append(None)
                silent += 1
        assert silent == 0, f"{silent} of {len(answers)} clients got no {kind} response within {timeout}s"
        return answers

    def early(self, kind: str) -> list[dict]:
        """Responses already received (without taking them)."""
        return [answer for client in self.clients for answer in list(client.responses[kind].queue)]

    def extra_responses(self, kind: str, settle: float = 1.0) -> int:
        """Responses beyond the ones received, after ``settle`` seconds for stragglers."""
        time.sleep(settle)
        return sum(client.responses[kind].qsize() for client in self.clients)

    def close(self) -> None:
        close_all(self.clients)


def close_all(clients: Sequence[WireClient]) -> None:
    """Disconnect every client at once (a websocket close may wait seconds for the server's reply)."""
    def close(client: WireClient) -> None:
        try:
            client.close()
        except Exception:  # already disconnected by the test
            pass

    with ThreadPoolExecutor(max(1, len(clients))) as pool:
        list(pool.map(close, clients))


@contextmanager
def crowd(urls: Sequence[str], size: int) -> Iterator[Crowd]:
    group = Crowd(urls, size)
    try:
        yield group
    finally:
        group.close()


class CalendarLoad:
    """Clients that each send calendar requests one at a time (a new window each time) until stopped,
    checking every answer is the one asked for and counting the ones that never come."""

    def __init__(self, url: str, days: Sequence[str], clients: int = 6, timeout: float = 60.0):
        self.days, self.timeout = list(days), timeout
        self.stopping = threading.Event()
        self.records: list[dict] = []
        self.silent: list[dict] = []
        self.url, self.retired = url, []
        self.clients = [WireClient(url) for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, cid: int) -> None:
        client, i = self.clients[cid], 0
        while not self.stopping.is_set():
            start = (cid * 97 + i * 13) % (len(self.days) - 8)
            end = start + 1 + i % 6
            sent = time.monotonic()
            client.send("calendar", calendar_body(self.days[start], self.days[end]))
            try:
                answer = client.receive("calendar", self.timeout)
            except queue.Empty:
                self.silent.append({"client": cid, "request": i, "sent": sent})
                # A late answer could be taken for the next one's: go on with a new connection.
                old, client = client, WireClient(self.url)
                self.clients[cid] = client
                self.retired.append(old)
                i += 1
                continue
            got = [str(day)[:10] for day in answer["result"]] if answer["status"] == 0 else None
            self.records.append({"client": cid, "request": i, "status": answer["status"], "sent": sent,
                                 "seconds": time.monotonic() - sent, "info": answer["detailed_info"],
                                 "wrong": got is not None and got != self.days[start:end + 1]})
            i += 1

    def stop(self, settle: float = 2.0) -> int:
        """Stop sending, wait for the requests in flight, then return how many extra answers came."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.timeout + 10)
        time.sleep(settle)
        extra = sum(client.responses["calendar"].qsize() for client in self.clients)
        close_all(self.clients + self.retired)
        return extra

    def summary(self) -> str:
        statuses = {}
        for record in self.records:
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        slowest = max((r["seconds"] for r in self.records), default=0.0)
        return (f"{len(self.records)} answers (by status {statuses}), {len(self.silent)} silent, "
                f"slowest {slowest:.1f}s")


def metric_sum(servers, name: str, **labels) -> float:
    """A counter summed over several request handlers."""
    return sum(server.metric(name, **labels) for server in servers)


# -- RabbitMQ and Redis ---------------------------------------------------------------------------


def _amqp(services) -> pika.BlockingConnection:
    params = pika.URLParameters(services.amqp_url())
    params.connection_attempts, params.socket_timeout = 1, 5
    return pika.BlockingConnection(params)


def queue_depth(services, queue: str) -> int:
    """Ready messages in ``queue`` (a passive declare: the queue must exist)."""
    connection = _amqp(services)
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def consumers(services, queue: str) -> int:
    """Consumers attached to ``queue`` (workers ready to take its tasks)."""
    connection = _amqp(services)
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    finally:
        connection.close()


def purge_queue(services, queue: str) -> int:
    connection = _amqp(services)
    try:
        return connection.channel().queue_purge(queue).method.message_count
    finally:
        connection.close()


def services_healthy(services) -> bool:
    try:
        _amqp(services).close()
        return bool(services.redis_client().ping())
    except Exception:
        return False


@contextmanager
def containers_restored(services, timeout: float = 120.0) -> Iterator[None]:
    """Whatever the block does to the session containers, leave both running and answering."""
    try:
        yield
    finally:
        for container in (services.rabbitmq, services.redis):
            if container is None:
                continue
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status == "paused":
                wrapped.unpause()
            elif wrapped.status != "running":
                wrapped.start()
        deadline = time.monotonic() + timeout
        while not services_healthy(services):
            if time.monotonic() > deadline:
                raise AssertionError("RabbitMQ/Redis containers did not come back")
            time.sleep(0.5)


# -- processes ----------------------------------------------------------------------------------


def worker_processes(server) -> list[psutil.Process]:
    """The data-processor worker processes under ``server`` (spawned children that spawn nothing)."""
    spawned = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    return [p for p in spawned if not any("spawn_main" in " ".join(c.cmdline()) for c in p.children())]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def workers_consuming(services, config: dict) -> bool:
    """Whether every worker of a server with ``config`` has started (each consumes only once Qlib is up)."""
    from qlib_server.broker.base import light_queue

    tasks = config["task_queue"]
    return (consumers(services, tasks), consumers(services, light_queue(tasks))) == \
        (config.get("max_process", 2), config.get("light_workers", 1))


def busy_workers(workers: Sequence[psutil.Process], baseline: Sequence[float], cpu: float = 1.0) -> list:
    """The workers that have burnt ``cpu`` seconds since ``baseline``."""
    busy = []
    for worker, before in zip(workers, baseline):
        try:
            if cpu_seconds(worker) - before >= cpu:
                busy.append(worker)
        except psutil.NoSuchProcess:
            continue
    return busy


def hold_lock_forever(host: str, port: int, db: int, lock_name: str, ready) -> None:
    """Subprocess body: take the python-redis-lock ``lock_name`` the way the registry does, then hang."""
    from qlib_server.state import keys

    lock = redis_lock.Lock(redis.Redis(host=host, port=port, db=db), lock_name, expire=keys.LOCK_EXPIRE)
    lock.acquire()
    ready.set()
    while True:
        time.sleep(60)


def server_registry(host: str, port: int, db: int, request_timeout: float = 60):
    """A SessionRegistry built the way a request handler builds its own (same pool and timeouts)."""
    from qlib_server.config import make_config
    from qlib_server.state.registry import SessionRegistry

    return SessionRegistry.from_config(make_config(provider_uri="/nonexistent", redis_host=host, redis_port=port,
                                                   redis_task_db=db, request_timeout=request_timeout))


def registry_churn(host: str, port: int, db: int, key: str, prefix: str, adds: int, seed: int) -> dict:
    """Subprocess (or thread) body: add ``adds`` waiters to ``key`` and answer it now and then.

    Returns the sids added, the ones told they were first, and each batch answered (in order).
    """
    registry = server_registry(host, port, db)
    rng = random.Random(seed)
    added, first, batches = [], [], []
    for i in range(adds):
        sid = f"{prefix}-{i}"
        if registry.add(key, sid):
            first.append(sid)
        added.append(sid)
        if rng.random() < 0.2:
            with registry.answering(key) as sids:
                if sids:
                    batches.append(list(sids))
                time.sleep(rng.random() * 0.005)  # emitting to every waiter takes a while
    return {"added": added, "first": first, "batches": batches}


# -- a TCP proxy that can cut connections ----------------------------------------------------------


def _abort(sock: socket.socket) -> None:
    """Close with a reset, waking any thread blocked on the socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` resets every connection, :meth:`down`
    also refuses new ones until the block ends, :meth:`stalled` holds all traffic until it ends."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.accepted = 0
        self._lock = threading.Lock()
        self._refusing = False
        self._closed = False
        self._flowing = threading.Event()
        self._flowing.set()
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._refusing:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self.pairs.add(pair)
                self.accepted += 1
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair) -> bool:
        with self._lock:
            if pair not in self.pairs:
                return False
            self.pairs.discard(pair)
        for sock in pair:
            _abort(sock)
        return True

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        with self._lock:
            pairs = list(self.pairs)
        return sum(self._drop(pair) for pair in pairs)

    @contextmanager
    def down(self) -> Iterator[int]:
        """Cut every connection, and accept-then-reset new ones (what a port proxy does while the
        service behind it restarts), for the duration of the block."""
        self._refusing = True
        try:
            yield self.cut()
        finally:
            self._refusing = False

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """Keep every connection open but forward nothing until the block ends."""
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.listener.close()
        self.cut()


@contextmanager
def proxy_to(host: str, port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    try:
        yield proxy
    finally:
        proxy.close()
