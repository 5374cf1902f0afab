"""One persistent connection per process to a Qlib-Server, shared by the providers and their threads.

Requests go over one Socket.IO connection (websocket transport); each carries an id in its head that
its answer echoes, so concurrent requests are matched to their answers. Every request is idempotent, so
a server that cannot be reached (stopped, restarting) or that answers that it is shutting down (its
answer carries ``"retry": true``) is asked again with exponential backoff until the request's timeout,
which then raises :class:`RequestTimeout` naming the address; a request whose connection dropped is
sent again up to ``retries`` times. Only the server's refusal of this client (``allowed_networks``,
``auth_token``) raises :class:`AdmissionRefused`, at once. Feature rows come over HTTP from the same
port (``POST /features``, an Arrow stream). Errors are those pyqlib's own client raises: a server error
is ``ValueError("Bad response(status==N), detailed info: ...")``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import requests
import socketio
import urllib3

from .frames import datetime_unit, read_frame
from .placed import read_placed

log = logging.getLogger(__name__)
REQUEST_TYPES = ("calendar", "instrument", "feature")
DELIVERIES = ("auto", "files", "stream")
MEDIA_TYPE = "application/vnd.apache.arrow.stream"
FIRST_PAUSE, LONGEST_PAUSE = 0.2, 2.0  # seconds between tries of an unreachable or draining server (doubling)


class RequestTimeout(TimeoutError):
    """No answer came within the request's timeout (the server computed too long, could not be reached,
    or was shutting down all along); the message names the server's address."""


class AdmissionRefused(ConnectionError):
    """The server refused this client (``allowed_networks`` / ``auth_token``)."""


def backoff(deadline: float, pause: float, why: str) -> float:
    """Wait about ``pause`` seconds (jittered, never past ``deadline``) and return the next pause; raise
    :class:`RequestTimeout` saying ``why`` once the deadline has passed."""
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(min(left, pause * random.uniform(0.5, 1.0)))
    if time.monotonic() >= deadline:
        raise RequestTimeout(why)
    return min(pause * 2, LONGEST_PAUSE)


def retry_after(header: Optional[str], default: float) -> float:
    """The seconds a ``Retry-After`` header of seconds asks for (at most :data:`LONGEST_PAUSE`), else ``default``."""
    try:
        return min(LONGEST_PAUSE, max(0.0, float(header))) if header else default
    except ValueError:  # an HTTP date: not what qlib-server sends
        return default


def bad_response(status: Any, info: Any) -> ValueError:
    """The exception pyqlib's client raises for an error answer."""
    return ValueError(f"Bad response(status=={status}), detailed info: {info}")


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    answer: Optional[dict] = None
    dropped: bool = False


class ServerConnection:
    """The connection of this process to the server at ``host:port`` (see the module docstring)."""

    def __init__(self, host: str, port: int, timeout: float = 100.0, auth_token: Optional[str] = None,
                 retries: int = 3, max_inflight: int = 8, compression: str = "auto", connect_timeout: float = 10.0,
                 delivery: str = "auto"):
        if delivery not in DELIVERIES:
            raise ValueError(f"delivery must be one of {', '.join(DELIVERIES)}, not {delivery!r}")
        self.address = f"{host}:{port}"
        self.url = f"http://{self.address}"
        self.timeout = float(timeout)
        self.auth_token = auth_token
        self.retries = int(retries)
        here = same_host(host, port)
        self.compression = compression if compression != "auto" else "none" if here else "lz4"
        self.maps_files = delivery == "files" or (delivery == "auto" and here)  # until a mapping fails
        self.connect_timeout = float(connect_timeout)
        self.datetime_unit = datetime_unit()  # of the frames local Qlib builds with this process's pandas
        self._slots = threading.BoundedSemaphore(max_inflight)  # the server's max_inflight_per_client
        self._waiting: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._connecting = threading.Lock()
        self._connect_error: Any = None
        self._http = threading.local()
        self._version = __import__("qlib").__version__
        self.sio = socketio.Client(reconnection=False, logger=False, engineio_logger=False)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)
        for kind in REQUEST_TYPES:
            self.sio.on(f"{kind}_response", self._on_answer)

    # -- Socket.IO events (on the client's reading thread) -----------------------------------------
    def _on_answer(self, message: Any = None, *_) -> None:
        rid = message.get("id") if isinstance(message, dict) else None
        with self._lock:
            waiter = self._waiting.get(rid) if isinstance(rid, str) else None
        if waiter is not None:
            waiter.answer = message
            waiter.event.set()

    def _on_disconnect(self, *_) -> None:
        with self._lock:
            for waiter in self._waiting.values():
                waiter.dropped = True
                waiter.event.set()

    def _on_connect_error(self, data: Any = None, *_) -> None:
        # python-socketio calls this both when the server refuses the connection and when no connection
        # could be made at all; only the first leaves the namespace in ``failed_namespaces``
        self._connect_error = data.get("message") if isinstance(data, dict) else data

    # -- connecting --------------------------------------------------------------------------------
    def _connect(self, deadline: float) -> None:
        """Connect unless connected, retrying an unreachable server with exponential backoff until
        ``deadline``; raise :class:`AdmissionRefused` at once when the server refuses this client."""
        pause = FIRST_PAUSE
        while not self.sio.connected:
            with self._connecting:
                if self.sio.connected:
                    return
                self._connect_error = None
                try:
                    self.sio.connect(self.url, transports=["websocket"],
                                     wait_timeout=max(0.5, min(self.connect_timeout, deadline - time.monotonic())),
                                     auth={"token": self.auth_token} if self.auth_token else None)
                    return
                except socketio.exceptions.ConnectionError as exc:
                    if self.sio.failed_namespaces:  # the server answered, with a refusal
                        raise AdmissionRefused(f"{self.url} refused this client ({self._connect_error}): it "
                                               "admits clients by allowed_networks or auth_token") from None
                    reason = self._connect_error or exc
            log.info("cannot connect to %s (%s); trying again", self.url, reason)
            pause = backoff(deadline, pause, f"cannot reach qlib-server at {self.address} within the request's "
                                             f"timeout: {reason}")

    # -- requests ----------------------------------------------------------------------------------
    def request(self, kind: str, body: dict, timeout: Optional[float] = None) -> Any:
        """Send one ``<kind>_request`` and return its result; raise as pyqlib's client does on an error."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if not self._slots.acquire(timeout=limit):
            raise RequestTimeout(f"no free request slot within {limit:g}s (max_inflight)")
        try:
            drops, pause = 0, FIRST_PAUSE
            while True:
                self._connect(deadline)
                answer = self._send(kind, body, deadline, limit)
                if answer is None:
                    drops += 1
                    if drops > self.retries:
                        raise ConnectionError(f"the connection to {self.url} dropped {drops} times during a "
                                              f"{kind} request")
                    log.info("connection to %s dropped during a %s request; sending it again", self.url, kind)
                elif answer.get("retry") is True:  # the server is shutting down: ask again, it or its successor
                    log.info("%s answered a %s request with %r; asking again", self.url, kind,
                             answer.get("detailed_info"))
                    pause = backoff(deadline, pause, f"qlib-server at {self.address} was shutting down for the "
                                                     f"whole {limit:g}s of a {kind} request")
                else:
                    break
        finally:
            self._slots.release()
        if answer.get("status") != 0:
            raise bad_response(answer.get("status"), answer.get("detailed_info"))
        return answer.get("result")

    def _send(self, kind: str, body: dict, deadline: float, limit: float) -> Optional[dict]:
        """The answer of one attempt, or None when the connection dropped before it came."""
        rid, waiter = uuid.uuid4().hex, _Waiter()
        with self._lock:
            self._waiting[rid] = waiter
        try:
            try:
                self.sio.emit(f"{kind}_request", {"head": {"version": self._version, "id": rid},
                                                  "body": json.dumps(body, default=str)})
            except socketio.exceptions.SocketIOError:  # disconnected in between
                return None
            if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
                raise RequestTimeout(f"no answer from qlib-server at {self.address} to a {kind} request within "
                                     f"{limit:g}s")
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        return None if waiter.dropped and waiter.answer is None else waiter.answer

    def features(self, body: dict, fields: list[str]):
        """The frame of a feature request, streamed from the server's dataset cache (computed first,
        through the pipeline, when the server has no current cache of it)."""
        deadline = time.monotonic() + self.timeout
        body = {**body, "stream": True}  # this client streams the cache: the server writes no HDF5 file for it
        payload: dict[str, Any] = {"head": {"version": self._version}, "body": json.dumps(body, default=str)}
        computed, failures, pause, placed = False, 0, FIRST_PAUSE, self.maps_files
        late = f"no feature data from qlib-server at {self.address} within {self.timeout:g}s"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(late)
            params = {"compression": self.compression, **({"delivery": "files"} if placed else {})}
            try:
                reply = self._session().post(f"{self.url}/features", json=payload, params=params,
                                             headers=self._headers(), stream=True,
                                             timeout=(min(self.connect_timeout, left), left))
            except requests.RequestException as exc:  # no answer began: the server is down or restarting
                if isinstance(exc, requests.ReadTimeout):
                    raise RequestTimeout(late) from None
                log.info("no feature transfer from %s (%s); asking again", self.url, exc)
                pause = backoff(deadline, pause, f"cannot reach qlib-server at {self.address} within the request's "
                                                 f"timeout: {exc}")
                continue
            try:
                with reply:
                    if reply.status_code == 200 and reply.headers.get("Content-Type", "").startswith(MEDIA_TYPE):
                        reply.raw.decode_content = True
                        return read_frame(reply.raw, fields, self.datetime_unit)
                    answer = _json(reply)
                if reply.status_code == 200 and placed:
                    try:
                        return read_placed(answer.get("result") or {}, fields, self.datetime_unit)
                    except OSError as exc:  # not this host's file, replaced in between, or no permission
                        log.info("cannot map the dataset cache of %s (%s); streaming it", self.url, exc)
                        placed = False
                        self.maps_files = self.maps_files and _replaced(exc)  # else: stream from now on
                        continue
            except (requests.RequestException, urllib3.exceptions.HTTPError, pa.ArrowInvalid, ConnectionError,
                    OSError) as exc:  # the transfer broke off
                if isinstance(exc, requests.Timeout) and deadline - time.monotonic() <= 0:
                    raise RequestTimeout(late) from None
                failures += 1
                if failures > self.retries:
                    raise ConnectionError(f"feature transfer from {self.url} failed {failures} times: {exc}") from None
                log.info("feature transfer from %s failed (%s); retrying", self.url, exc)
                time.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            if reply.status_code == 403:
                raise AdmissionRefused(f"{self.url} refused this client: {answer.get('detailed_info')}")
            if reply.status_code == 429:  # every transfer slot is taken: wait as long as the server says, then again
                busy = f"qlib-server at {self.address} stayed busy past the request's timeout: " \
                       f"{answer.get('detailed_info')}"
                log.info("feature transfer from %s refused for now (%s); asking again", self.url,
                         answer.get("detailed_info"))
                backoff(deadline, 2 * retry_after(reply.headers.get("Retry-After"), pause), busy)
                continue
            if reply.status_code == 409 and not computed:
                self.request("feature", body, timeout=max(0.001, deadline - time.monotonic()))
                computed = True
                continue
            raise bad_response(answer.get("status", 2), answer.get("detailed_info", f"HTTP {reply.status_code}"))

    def _session(self) -> requests.Session:
        session = getattr(self._http, "session", None)
        if session is None:
            session = self._http.session = requests.Session()
        return session

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def close(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()


def same_host(host: str, port: int) -> bool:
    """Whether ``host`` is this machine: a route to it starts from its own address."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, _, _, address in addresses:
        with socket.socket(family, kind) as probe:
            try:
                probe.connect(address)  # UDP: sends nothing, only picks the route
            except OSError:
                continue
            if probe.getsockname()[0] == address[0]:
                return True
    return False


def _replaced(error: OSError) -> bool:
    """Whether a file the server named is gone from a directory this process sees: the cache was replaced
    between the answer and the mapping (a file of another host's, or of no permission, is not)."""
    return isinstance(error, FileNotFoundError) and os.path.isdir(os.path.dirname(str(error.filename or "")))


def _json(reply) -> dict:
    try:
        answer = reply.json()
    except ValueError:
        answer = None
    return answer if isinstance(answer, dict) else {"status": 2, "detailed_info": f"HTTP {reply.status_code}"}


_connections: dict[tuple, ServerConnection] = {}
_registry_lock = threading.Lock()


def shared_connection(host: str, port: int, **options) -> ServerConnection:
    """The connection of this process to ``host:port`` with these options (made on first use)."""
    key = (os.getpid(), host, int(port), tuple(sorted(options.items())))
    with _registry_lock:
        if key not in _connections:
            _connections[key] = ServerConnection(host, port, **options)
        return _connections[key]
