"""Hostile clients against the HTTP endpoints of a real server (RabbitMQ, Redis, admission on).

Each hostile request gets a clear JSON answer (``{"result": null, "status": ..., "detailed_info": ...}``),
never an HTML page; a body is read up to its route's limit and no further (the handler's memory does not
grow with what a client sends); slow senders, slow readers, floods of transfers and of status event
streams are bounded by the limits of the config; after each case the same server serves a good request.

Requests go over raw sockets, so that a body can be made lazily (1 GiB is never held here), sent from
several loopback addresses (127.0.0.x: each a client address of its own), and left unread.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import pytest
import yaml
from clients import WireClient
from conftest import ServerProcess, free_port, wait_until

from qlib_server.client.connection import ServerConnection
from qlib_server.client.frames import read_frame

pytestmark = pytest.mark.integration

TOKEN = "hostile-http-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN_ADDRESS = "127.0.0.2"  # the one address in allowed_networks: admitted without the token
TIMEOUT = 3.0  # transfer_timeout of the server
LIMITS = {"auth_token": TOKEN, "allowed_networks": [f"{OPEN_ADDRESS}/32"], "transfer_timeout": TIMEOUT,
          "max_transfers": 3, "max_transfers_per_client": 2, "max_event_streams": 3, "max_event_streams_per_client": 2}
HEAD = {"version": "0.9.7"}
SMALL = {"instruments": ["SH600000", "SZ000001"], "fields": ["$close", "Mean($close, 5)"], "start_time": "2019-01-02",
         "end_time": "2019-06-28", "freq": "day", "disk_cache": 1}
# a wide answer (30 instruments x 750 days x 200 fields, about 18 MB uncompressed): more than the socket buffers
# hold, so a transfer whose client reads nothing stays blocked in the server until it is released
WIDE = {"instruments": {"market": "all", "filter_pipe": []},
        "fields": [f"Ref($close, {i})" for i in range(1, 101)] + [f"Ref($open, {i})" for i in range(1, 101)],
        "freq": "day", "disk_cache": 1}
MiB = 1 << 20
GiB = 1 << 30


def envelope(body: dict) -> bytes:
    return json.dumps({"head": HEAD, "body": json.dumps(body)}).encode()


# -- raw HTTP --------------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict  # names in lower case
    body: bytes
    sent: int  # bytes of the request the client got to send
    seconds: float  # from the first byte sent until the whole answer was read
    closed: bool | None  # the server closed the connection after its answer (None: not watched)

    @property
    def json(self) -> dict:
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.headers,
                                                                                     self.body[:300])
        return json.loads(self.body)

    def refused(self, status: int, *words: str) -> dict:
        """Assert a JSON refusal with this HTTP status whose message holds ``words``; return its JSON."""
        answer = self.json
        assert self.status == status, (self.status, answer)
        assert answer["result"] is None and answer["status"] in (1, 2), answer
        info = answer["detailed_info"]
        assert isinstance(info, str) and info.strip(), answer
        for word in words:
            assert word in info, (word, info)
        return answer


def head(method: str, path: str, headers: dict | None = None, chunked: bool = False, length: int | None = None,
         content_type: str | None = "application/json") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunks(data: bytes) -> Iterator[bytes]:
    """``data`` as one chunk (when any), then the last chunk."""
    if data:
        yield b"%x\r\n" % len(data) + data + b"\r\n"
    yield b"0\r\n\r\n"


def huge_chunked(prefix: bytes, total: int, piece: int = MiB) -> Iterator[bytes]:
    """A chunked body of ``total`` bytes, ``prefix`` then filler, made as it is sent (1 MiB at a time)."""
    filler = b"x" * piece
    yield b"%x\r\n" % len(prefix) + prefix + b"\r\n"
    made = len(prefix)
    while made < total:
        n = min(piece, total - made)
        yield b"%x\r\n" % n
        yield filler[:n]
        yield b"\r\n"
        made += n
    yield b"0\r\n\r\n"


def connect(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connecting: a small window
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def send(sock: socket.socket, request: bytes, body: Iterable[bytes] = (), pause: float = 0.0) -> int:
    """Send the request head, then the pieces of ``body`` until the server answers or closes; ``pause``
    seconds between pieces (a slow sender), cut short by an answer."""
    sock.sendall(request)
    sent = len(request)
    for piece in body:
        if select.select([sock], [], [], pause)[0]:  # an answer (or the end of the connection) is there
            break
        try:
            sock.sendall(piece)
        except OSError:  # the server closed the connection
            break
        sent += len(piece)
    return sent


def read_head(reader) -> tuple[int, dict]:
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def read_rest(reader, headers: dict) -> bytes:
    if "content-length" in headers:
        return reader.read(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while (size := int(reader.readline().split(b";")[0], 16)) > 0:
            out += reader.read(size)
            reader.readline()
        reader.readline()
        return bytes(out)
    return reader.read()


def server_closed(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def exchange(port: int, request: bytes, body: Iterable[bytes] = (), source: str = "127.0.0.1",
             pause: float = 0.0, watch_close: float = 0.0) -> Answer:
    """One request over a fresh connection: its answer, and whether the server then closed the connection
    within ``watch_close`` seconds (0: not watched)."""
    with connect(port, source) as sock:
        started = time.monotonic()
        sent = send(sock, request, body, pause)
        reader = sock.makefile("rb")
        status, headers = read_head(reader)
        data = read_rest(reader, headers)
        seconds = time.monotonic() - started
        return Answer(status, headers, data, sent, seconds, server_closed(sock, watch_close) if watch_close else None)


def post_features(port: int, body: dict, source: str = "127.0.0.1", headers: dict | None = None,
                  query: str = "") -> Answer:
    """``POST /features`` of ``body`` (with the token in the header unless ``headers`` are given)."""
    data = envelope(body)
    return exchange(port, head("POST", f"/features?compression=lz4{query}", AUTH if headers is None else headers,
                               length=len(data)) + data, source=source)


@contextmanager
def held_transfer(port: int, source: str, body: dict = WIDE) -> Iterator:
    """A transfer of ``body`` whose client reads its head and then nothing (a 4 KiB receive window):
    yields (status, headers, reader) and closes the connection after."""
    with connect(port, source, rcvbuf=4096) as sock:
        data = envelope(body)
        sock.sendall(head("POST", "/features?compression=none", AUTH, length=len(data)) + data)
        reader = sock.makefile("rb")
        status, headers = read_head(reader)
        yield status, headers, reader


def assert_served(server: ServerProcess) -> None:
    """The server still serves: a feature transfer gives the frame, the status page its view; nothing raised."""
    answer = post_features(server.port, SMALL)
    assert answer.status == 200, (answer.status, answer.body[:300])
    frame = read_frame(io.BytesIO(answer.body), SMALL["fields"])
    assert len(frame) > 100 and list(frame.columns) == SMALL["fields"]
    view = exchange(server.port, head("GET", "/status.json", AUTH, content_type=None))
    assert view.status == 200 and view.json["node"]
    assert server.proc.poll() is None
    assert "Traceback" not in server.log(), server.log()[-3000:]


class PeakRss:
    """The peak resident memory of a process, sampled every 10 ms while inside the ``with``."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.idle = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


# -- the server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(services, dataset, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server (handler and processor) with admission on and small HTTP limits, its caches computed."""
    directory = tmp_path_factory.mktemp("hostile-http")
    suffix = uuid.uuid4().hex[:8]
    config = {"provider_uri": str(dataset), "region": "cn", "flask_server": "127.0.0.1", "flask_port": free_port(),
              "queue_host": services.amqp_host, "queue_port": services.amqp_port, "redis_host": services.redis_host,
              "redis_port": services.redis_port, "redis_task_db": services.fresh_db(), "task_queue": f"tasks-{suffix}",
              "message_queue": f"results-{suffix}", "max_process": 2, "logging_level": "INFO", **LIMITS}
    config_path, log_path = directory / "server.yaml", directory / "server.log"
    config_path.write_text(yaml.safe_dump(config))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    started = ServerProcess(config, config_path, log_path, proc)
    try:
        wait_until(lambda: started.ready() or proc.poll() is not None, 90, what="server ready")
        assert proc.poll() is None, started.log()[-3000:]
        with WireClient(started.url, auth={"token": TOKEN}) as client:
            for body in (SMALL, WIDE):
                computed = client.request("feature", body, timeout=180)
                assert computed["status"] == 0, computed
        assert_served(started)
        yield started
    finally:
        started.stop()


# -- bodies over the limit -------------------------------------------------------------------------------
def test_1_gib_bodies_are_refused_after_their_first_megabytes_and_the_handler_grows_less_than_100_mb(server):
    """Three 1 GiB chunked bodies at once (issue 23's case), a declared 1 GiB body, 1 GiB sent to a route
    that takes no body and to a route that does not exist: each refused at once, its connection closed."""
    prefix = b'{"head": {"version": "0.9.7"}, "body": "'
    cases = [(f"chunked body #{n}", f"127.0.0.{3 + n}", head("POST", "/features", AUTH, chunked=True),
              huge_chunked(prefix, GiB), 413, "2 x max_body_bytes") for n in range(3)]
    cases += [
        ("declared 1 GiB", "127.0.0.1", head("POST", "/features", AUTH, length=GiB), huge_chunked(b"", GiB), 413,
         f"body of {GiB} bytes"),
        ("chunked to /status.json", "127.0.0.1", head("GET", "/status.json", AUTH, chunked=True),
         huge_chunked(b"", GiB), 413, "takes no request body"),
        ("chunked to /nowhere", "127.0.0.1", head("POST", "/nowhere", AUTH, chunked=True), huge_chunked(b"", GiB),
         404, "Not Found"),
    ]
    answers: dict[str, Answer] = {}

    def run(what, source, request, body):
        answers[what] = exchange(server.port, request, body, source, watch_close=5)

    with PeakRss(server.proc.pid) as rss:
        threads = [threading.Thread(target=run, args=case[:4]) for case in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    print(f"\nhandler RSS {rss.idle / MiB:.0f} MiB idle, {rss.peak / MiB:.0f} MiB at the peak")
    for what, _, _, _, status, words in cases:
        answer = answers[what]
        print(f"{what}: {answer.status} after {answer.seconds:.2f}s, {answer.sent / MiB:.1f} MiB sent: "
              f"{answer.json['detailed_info']}")
        answer.refused(status, words)
        assert answer.closed, what
        assert answer.sent < 64 * MiB and answer.seconds < 15, what
    assert rss.peak - rss.idle < 100 * MiB
    assert_served(server)


def test_a_body_just_over_the_limit_is_refused_and_one_within_it_is_read_and_checked(server):
    limit = 2 * (1 << 20) + 4096  # 2 x max_body_bytes + 4 KiB
    over = b'{"head": {"version": "0.9.7"}, "body": "' + b"y" * limit + b'"}'
    for request in (head("POST", "/features", AUTH, length=len(over)) + over,
                    head("POST", "/features", AUTH, chunked=True) + b"".join(chunks(over))):
        answer = exchange(server.port, request, watch_close=5)
        answer.refused(413, str(limit))
        assert answer.closed
    within = json.dumps({"head": HEAD, "body": json.dumps({**SMALL, "fields": ["$close"] * 110_000})}).encode()
    assert (1 << 20) < len(within) < limit
    answer = exchange(server.port, head("POST", "/features", AUTH, chunked=True), chunks(within), watch_close=1)
    answer.refused(400, "max_body_bytes")  # read whole, then refused by the request checks
    assert not answer.closed  # the body was read to its end: the connection is kept
    assert_served(server)


# -- bodies that cannot be decoded, methods and paths ----------------------------------------------------
def test_bodies_that_cannot_be_decoded_get_400_with_a_json_answer(server):
    deep = b'{"head": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    deep_inside = json.dumps({"head": HEAD, "body": "[" * 100_000 + "]" * 100_000}).encode()
    cases = [
        ("JSON nested 200,000 deep", deep, "application/json", "nested too deeply"),
        ("JSON nested 100,000 deep in the body", deep_inside, "application/json", "not valid JSON"),
        ("junk bytes", bytes(range(256)) * 64, "application/json", "not UTF-8"),
        ("bad UTF-8", b'{"head": "\xff\xfe\xfd", "body": "\x80"}', "application/json", "not UTF-8"),
        ("invalid JSON", b'{"head": {"version": ', "application/json", "not valid JSON"),
        ("a JSON list", json.dumps([HEAD, SMALL]).encode(), "application/json", '{"head"'),
        ("a JSON string", b'"features please"', "application/json", '{"head"'),
        ("no body", b"", "application/json", "not valid JSON"),
        ("text/plain", envelope(SMALL), "text/plain", "application/json"),
        ("form data", b"head=1&body=2", "application/x-www-form-urlencoded", "application/json"),
        ("no content type", envelope(SMALL), None, "application/json"),
        ("code in a field", envelope({**SMALL, "fields": ["__import__('os').system('true')"]}), "application/json",
         "expression refused"),
        ("path in a market", envelope({**SMALL, "instruments": {"market": "../../etc"}}), "application/json",
         "market"),
    ]
    for what, body, content_type, words in cases:
        for chunked in (False, True):
            request = head("POST", "/features", AUTH, chunked=chunked, length=None if chunked else len(body),
                           content_type=content_type)
            answer = exchange(server.port, request + (b"".join(chunks(body)) if chunked else body))
            print(f"\n{what} ({'chunked' if chunked else 'Content-Length'}): {answer.status} "
                  f"{answer.json['detailed_info']}")
            answer.refused(400, words)
    broken = exchange(server.port, head("POST", "/features", AUTH, chunked=True) + b"zz\r\n{}\r\n0\r\n\r\n",
                      watch_close=5)
    broken.refused(400, "could not be read")
    assert broken.closed
    exchange(server.port, head("POST", "/features?compression=gzip", AUTH, length=2) + b"{}").refused(400, "lz4")
    exchange(server.port, head("POST", "/features?delivery=mmap", AUTH, length=2) + b"{}").refused(400, "files")
    assert_served(server)


def test_wrong_methods_unknown_paths_and_bodies_where_none_is_taken_get_json_answers(server):
    for method, path, allowed in [("GET", "/features", "POST"), ("PUT", "/features", "POST"),
                                  ("DELETE", "/status.json", "GET"), ("POST", "/metrics", "GET"),
                                  ("PATCH", "/", "GET"), ("POST", "/healthz", "GET"), ("PUT", "/status/events", "GET")]:
        answer = exchange(server.port, head(method, path, AUTH, length=2) + b"{}")
        answer.refused(405, "Method Not Allowed")
        assert allowed in answer.headers["allow"], (method, path, answer.headers)
    exchange(server.port, head("GET", "/admin", AUTH)).refused(404, "Not Found")
    exchange(server.port, head("GET", "/../../etc/passwd", AUTH)).refused(404)
    exchange(server.port, head("GET", "/static/status.html", AUTH)).refused(404)
    for path in ("/metrics", "/status.json", "/healthz"):
        answer = exchange(server.port, head("GET", path, AUTH, length=5) + b"hello", watch_close=5)
        answer.refused(413, "takes no request body")
        assert answer.closed
    assert_served(server)


# -- slow senders, slow readers, floods ------------------------------------------------------------------
def test_slow_senders_are_answered_408_after_transfer_timeout_and_their_slots_are_free_again(server):
    """Three slow senders from one address: two hold its two slots until they are answered 408, the third
    is answered 429 at once."""
    body = envelope(SMALL)
    trickled = [body[i:i + 8] for i in range(0, 64, 8)]
    senders = {
        "Content-Length": (head("POST", "/features", AUTH, length=len(body)), trickled),
        "chunked": (head("POST", "/features", AUTH, chunked=True), [b"8\r\n" + p + b"\r\n" for p in trickled]),
        "chunked #2": (head("POST", "/features", AUTH, chunked=True), [b"8\r\n" + p + b"\r\n" for p in trickled]),
    }
    answers: dict[str, Answer] = {}

    def run(what, request, pieces):
        answers[what] = exchange(server.port, request, pieces, "127.0.0.3", pause=1.0, watch_close=5)

    threads = [threading.Thread(target=run, args=(what, *sender)) for what, sender in senders.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for what, answer in answers.items():
        print(f"\nslow sender ({what}): {answer.status} after {answer.seconds:.1f}s: {answer.json['detailed_info']}")
    timed_out = [a for a in answers.values() if a.status == 408]
    waiting = [a for a in answers.values() if a.status == 429]
    assert len(timed_out) == 2 and len(waiting) == 1, {what: a.status for what, a in answers.items()}
    for answer in timed_out:
        answer.refused(408, "transfer_timeout")
        assert TIMEOUT <= answer.seconds < TIMEOUT + 5 and answer.closed
    waiting[0].refused(429, "max_transfers_per_client")
    assert waiting[0].seconds < TIMEOUT
    assert post_features(server.port, SMALL, "127.0.0.3").status == 200  # the slots are free again
    assert_served(server)


def test_a_transfer_whose_reader_stops_is_released_after_transfer_timeout_and_its_slot_is_free(server):
    source = "127.0.0.3"
    with held_transfer(server.port, source) as (first, _, _), held_transfer(server.port, source) as (second, _, _):
        assert first == second == 200
        started = time.monotonic()
        post_features(server.port, SMALL, source).refused(429, "max_transfers_per_client")
        wait_until(lambda: server.log().count(f"feature transfer to {source} released") == 2, TIMEOUT + 30,
                   what="both stalled transfers released")
        released = time.monotonic() - started
        print(f"\ntwo transfers whose reader stopped released after {released:.1f}s (transfer_timeout {TIMEOUT:g})")
        assert post_features(server.port, SMALL, source).status == 200  # while the stalled clients still hang on
    assert "the client took nothing of it for 3 s" in server.log()
    assert_served(server)


def test_transfers_beyond_the_limits_get_429_with_retry_after_and_are_served_once_others_finish(server):
    with held_transfer(server.port, "127.0.0.3") as a, held_transfer(server.port, "127.0.0.3") as b, \
            held_transfer(server.port, "127.0.0.4") as c:
        assert a[0] == b[0] == c[0] == 200
        per_client = post_features(server.port, SMALL, "127.0.0.3")
        in_all = post_features(server.port, SMALL, "127.0.0.5")
        per_client.refused(429, "max_transfers_per_client")
        in_all.refused(429, "max_transfers")
        assert "per_client" not in in_all.json["detailed_info"]
        for refused in (per_client, in_all):
            assert int(refused.headers["retry-after"]) >= 1
        print(f"\n{per_client.json['detailed_info']}\n{in_all.json['detailed_info']}")
        frames = []

        def finish(headers, reader):  # each held transfer read to its end (all at once: none left stalled)
            frames.append(read_frame(io.BytesIO(read_rest(reader, headers)), WIDE["fields"]))

        readers = [threading.Thread(target=finish, args=held[1:]) for held in (a, b, c)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        assert len(frames) == 3 and all(f.shape[1] == 200 and len(f) > 20_000 for f in frames)
        for source in ("127.0.0.5", "127.0.0.3"):
            assert post_features(server.port, SMALL, source).status == 200, source
    assert_served(server)


def test_qlib_server_client_waits_out_busy_transfer_slots_and_gets_its_frame(server, caplog):
    """Its address's two transfer slots held: the client's request is answered 429 with Retry-After, waits and
    asks again within its timeout, and gets the frame once a slot is free, not an error."""
    connection = ServerConnection("127.0.0.1", server.port, auth_token=TOKEN, timeout=60)
    got: dict = {}
    caplog.set_level(logging.INFO, logger="qlib_server.client.connection")
    try:
        with held_transfer(server.port, "127.0.0.1") as a, held_transfer(server.port, "127.0.0.1") as b:
            assert a[0] == b[0] == 200
            asking = threading.Thread(target=lambda: got.update(frame=connection.features(SMALL, SMALL["fields"])))
            asking.start()
            wait_until(lambda: "refused for now" in caplog.text, 30, what="the client refused 429")
            assert asking.is_alive() and "max_transfers_per_client" in caplog.text
            for _, headers, reader in (a, b):  # the held transfers read to their end: their slots free
                read_rest(reader, headers)
        asking.join(60)
        assert got["frame"].equals(connection.features(SMALL, SMALL["fields"]))
        assert len(got["frame"]) > 100
    finally:
        connection.close()
    assert_served(server)


def open_events(port: int, source: str) -> tuple[socket.socket, Answer | None]:
    """A status event stream: (its socket, None) when admitted, else (closed socket, the refusal)."""
    sock = connect(port, source)
    sock.sendall(head("GET", f"/status/events?token={TOKEN}", content_type=None))
    reader = sock.makefile("rb")
    status, headers = read_head(reader)
    if status == 200:
        assert headers["content-type"].startswith("text/event-stream")
        size = int(reader.readline(), 16)  # the first chunk of the stream: its retry field
        assert reader.read(size).startswith(b"retry:")
        return sock, None
    answer = Answer(status, headers, read_rest(reader, headers), 0, 0.0, False)
    sock.close()
    return sock, answer


def test_status_event_streams_are_capped_per_client_address_and_in_all(server):
    streams = []
    try:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.3"):
            sock, refused = open_events(server.port, source)
            assert refused is None, refused
            streams.append(sock)
        _, per_client = open_events(server.port, "127.0.0.1")
        _, in_all = open_events(server.port, "127.0.0.4")
        per_client.refused(429, "max_event_streams_per_client")
        in_all.refused(429, "max_event_streams")
        assert "retry-after" in in_all.headers
        streams.pop(0).close()  # a page goes away: its stream ends at the next view sent

        def admitted():
            sock, refused = open_events(server.port, "127.0.0.4")
            if refused is None:
                streams.append(sock)
            return refused is None

        wait_until(admitted, 15, interval=0.2, what="a stream admitted once another closed")
    finally:
        for sock in streams:
            sock.close()
    assert_served(server)


# -- admission -------------------------------------------------------------------------------------------
def test_every_admission_case_is_refused_with_403_json_and_its_body_left_unread(server):
    paths = [("GET", "/"), ("GET", "/status.json"), ("GET", "/status/events"), ("GET", "/metrics"),
             ("POST", "/features")]
    refusals = 0
    for method, path in paths:
        body = envelope(SMALL) if method == "POST" else b""
        for source, headers, query in [("127.0.0.1", {}, ""), ("127.0.0.1", {"Authorization": "Bearer wrong"}, ""),
                                       ("127.0.0.1", {"Authorization": f"Basic {TOKEN}"}, ""),
                                       ("127.0.0.1", {}, "?token=wrong"), ("127.0.0.3", {}, ""),
                                       ("127.0.0.3", {"Authorization": f"Bearer {TOKEN[:-1]}"}, "")]:
            request = head(method, path + query, headers, length=len(body) if body else None)
            exchange(server.port, request + body, source=source).refused(403, "auth_token")
            refusals += 1
    admitted = [(OPEN_ADDRESS, {}, ""), ("127.0.0.1", AUTH, ""), ("127.0.0.3", {}, f"&token={TOKEN}")]
    for source, headers, query in admitted:
        assert post_features(server.port, SMALL, source, headers, query).status == 200, (source, headers, query)
        answer = exchange(server.port, head("GET", "/metrics?" + query, headers, content_type=None), source=source)
        assert answer.status == 200 and b"qlib_server_requests_total" in answer.body
    refused = exchange(server.port, head("POST", "/features", chunked=True), huge_chunked(b"{", GiB), watch_close=5)
    refused.refused(403, "auth_token")
    assert refused.closed and refused.sent < 64 * MiB
    assert server.metric("qlib_server_refused_connections_total") >= refusals + 1
    assert "refused feature transfer to 127.0.0.3" in server.log()
    assert_served(server)
