"""The HTTP side under hostile clients: request bodies read in bounded pieces up to a limit and no further,
answers that a client stops reading released after a timeout, slots that bound concurrent streams, and
a JSON answer (``{"result": null, "status": ..., "detailed_info": ...}``, the shape of every Socket.IO
answer) to everything, errors included: Flask's HTML error pages are never sent.

A body is never read past its limit: gevent's server would otherwise read (and discard) the rest of any
body the application left unread before it answers the next request on the connection, so a refused or
unread body gets ``Connection: close`` and is not drained: the connection closes after the answer (after
a short :func:`linger`, so that the client gets to read it).
The timeouts hold in gevent mode (the default); the threading mode is Werkzeug's development server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 10  # what one read of a request body takes from the connection at most
SLICE_BYTES = 256 << 10  # an answer is written in slices of this size at most, each within transfer_timeout
RETRY_AFTER = 1  # seconds: the hint sent with a 429
LINGER_SECONDS, LINGER_BYTES = 2.0, 16 << 20  # what is read and thrown away after refusing a body, at most
_READ_WHOLE = "qlib_server.body_read"  # environ key: this request's body was read to its end


def answer(code: int, status: int, info: str, headers: Optional[dict] = None) -> Response:
    """The JSON answer every HTTP error gets."""
    body = json.dumps({"result": None, "status": status, "detailed_info": info})
    return Response(body, code, mimetype="application/json", headers=headers)


class Refused(Exception):
    """Raised where a request is refused; :meth:`response` is its answer."""

    def __init__(self, code: int, info: str, status: int = 1, headers: Optional[dict] = None):
        super().__init__(info)
        self.code, self.info, self.status, self.headers = code, info, status, headers

    def response(self) -> Response:
        return answer(self.code, self.status, self.info, self.headers)


class ClientStalled(BrokenPipeError):
    """Raised in a request's greenlet whose client read nothing of its answer for too long; an EPIPE, so
    gevent's server closes the connection without a traceback."""


# -- request bodies ------------------------------------------------------------------------------------
def body_declared(environ: dict) -> bool:
    """Whether the request says a body follows (chunked, or a non-zero Content-Length)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    return environ.get("CONTENT_LENGTH", "").strip() not in ("", "0")


def stop_reading(environ: dict) -> None:
    """Leave the rest of this request's body unread: gevent's server would read it to its end after the
    answer (the flag is the one gevent sets itself on a body it cannot parse); the answer carries
    ``Connection: close``, so the connection closes instead."""
    stream: Any = environ.get("wsgi.input")
    if hasattr(stream, "_chunked_input_error"):
        stream._chunked_input_error = True


def linger(environ: dict, seconds: float = LINGER_SECONDS, most: int = LINGER_BYTES) -> None:
    """After an answer that left the body unread has been sent (gevent mode): end the sending side of the
    connection, then read and throw away what the client still sends, for at most ``seconds`` and ``most``
    bytes, a piece at a time. A client that stops sending once it sees the answer (as curl does) then
    reads it whole; closing at once with unread bytes would reset the connection, and a reset may destroy
    the answer before the client reads it."""
    stream: Any = environ.get("wsgi.input")
    rfile = getattr(stream, "rfile", None)
    if not hasattr(stream, "_chunked_input_error") or rfile is None:
        return
    import gevent

    try:
        with socket.socket(fileno=os.dup(rfile.fileno())) as sock:
            sock.shutdown(socket.SHUT_WR)
        thrown = 0
        with gevent.Timeout(seconds, False):
            while thrown < most:
                piece = rfile.read1(PIECE_BYTES)
                if not piece:
                    break
                thrown += len(piece)
    except OSError:  # the client is gone already
        pass


def _deadline(seconds: Optional[float]):
    if seconds is None:
        return contextlib.nullcontext()
    import gevent

    return gevent.Timeout(seconds)


def read_body(limit: int, what: str, timeout: Optional[float]) -> bytes:
    """This request's body, at most ``limit`` bytes, read in pieces of at most ``PIECE_BYTES``.

    Refuses (413) a body declared or found larger as soon as its ``limit`` is passed: a declared length
    before anything is read, a chunked body after ``limit + 1`` bytes; 408 when the whole body takes more
    than ``timeout`` seconds to arrive (gevent mode); 400 when the chunked framing is broken.
    """
    environ = request.environ
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    length = request.content_length
    if not chunked and length is not None and length > limit:
        raise Refused(413, f"request body of {length} bytes is over {limit} bytes, the limit of {what}")
    if not chunked and not length:
        environ[_READ_WHOLE] = True
        return b""
    stream, data = environ["wsgi.input"], bytearray()
    timer = _deadline(timeout)
    try:
        with timer:
            while True:
                want = limit + 1 - len(data) if chunked else length - len(data)  # type: ignore[operator]
                if want <= 0:
                    break
                piece = stream.read(min(PIECE_BYTES, want))
                if not piece:
                    break
                data += piece
                if len(data) > limit:
                    raise Refused(413, f"request body over {limit} bytes, the limit of {what}; "
                                       "nothing more of it was read")
    except Refused:
        raise
    except BaseException as exc:
        if exc is timer:
            raise Refused(408, f"request body not received within {timeout:g} s (transfer_timeout)") from None
        if isinstance(exc, (OSError, ValueError)):  # gevent: a broken chunk size or framing
            raise Refused(400, f"request body could not be read: {str(exc)[:80]}") from None
        raise
    environ[_READ_WHOLE] = True
    return bytes(data)


def json_body(raw: bytes) -> Any:
    """The JSON value of a body; 400 naming what is wrong with it."""
    if request.mimetype != "application/json":
        raise Refused(400, f"request body must be application/json, not {request.mimetype[:60]!r}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(400, f"request body is not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise Refused(400, "request body is JSON nested too deeply") from None
    except ValueError as exc:
        raise Refused(400, f"request body is not valid JSON: {str(exc)[:80]}") from None


# -- answers the client must read ----------------------------------------------------------------------
def paced(pieces: Iterator, seconds: Optional[float], on_stall: Callable[[], None] = lambda: None) -> Iterator:
    """Yield what ``pieces`` yields, bytes in slices of at most ``SLICE_BYTES``; a slice the client does not
    take within ``seconds`` (the server blocked writing it) ends the answer there: :class:`ClientStalled` is
    raised in the greenlet writing it (gevent mode; ``seconds`` None: no limit), the connection is closed,
    ``on_stall`` called and ``pieces`` closed."""
    if seconds is None:
        yield from pieces
        return
    import gevent

    timer = gevent.Timeout(seconds, ClientStalled(errno.EPIPE, f"the client took nothing for {seconds:g} s"))
    handed = None
    try:
        for piece in pieces:
            if isinstance(piece, (bytes, bytearray)) and len(piece) > SLICE_BYTES:
                view = memoryview(piece)
                parts: Iterable = (view[i:i + SLICE_BYTES] for i in range(0, len(view), SLICE_BYTES))
            else:
                parts = (piece,)
            for part in parts:
                timer.start()
                handed = time.monotonic()
                try:
                    yield part
                finally:
                    timer.cancel()
                handed = None
    finally:
        if handed is not None and time.monotonic() - handed >= seconds * 0.99:
            on_stall()
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


class Slots:
    """At most ``total`` holders at once, at most ``per_client`` of them from one client address."""

    def __init__(self, total: int, per_client: int, what: str, keys: tuple[str, str]):
        self.total, self.per_client, self.what, self.keys = total, per_client, what, keys
        self.held: Counter = Counter()
        self.count = 0
        self._lock = threading.Lock()

    def take(self, client: Optional[str]) -> Callable[[], None]:
        """Take a slot for ``client``; the returned call (idempotent) frees it. Refused (429) when full."""
        client = client or "-"
        with self._lock:
            if self.held[client] >= self.per_client:
                over = f"{self.per_client} {self.what} of this client address at once ({self.keys[1]})"
            elif self.count >= self.total:
                over = f"{self.total} {self.what} at once on this handler ({self.keys[0]})"
            else:
                self.held[client] += 1
                self.count += 1
                over = None
        if over is not None:
            raise Refused(429, f"too many {self.what}: at most {over}; retry",
                          headers={"Retry-After": str(RETRY_AFTER)})
        freed: list[bool] = []

        def free() -> None:
            with self._lock:
                if freed:
                    return
                freed.append(True)
                self.count -= 1
                self.held[client] -= 1
                if not self.held[client]:
                    del self.held[client]

        return free


# -- every route ---------------------------------------------------------------------------------------
def install(app: Flask, body_endpoints: frozenset = frozenset({"features"})) -> None:
    """JSON answers for every error of ``app``; a body sent to a route that takes none refused (413);
    an answer to a request whose body was left unread closes its connection."""

    @app.before_request
    def no_body_where_none_is_taken():
        if request.routing_exception is None and request.endpoint not in body_endpoints \
                and body_declared(request.environ):
            return answer(413, 1, f"{request.method} {request.path[:60]} takes no request body")
        return None

    @app.after_request
    def close_unread(response: Response) -> Response:
        environ = request.environ
        if body_declared(environ) and not environ.get(_READ_WHOLE):
            response.headers["Connection"] = "close"
            stop_reading(environ)
            response.call_on_close(lambda: linger(environ))
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = exc.code or 500
        response = answer(code, 1 if code < 500 else 2, f"{code} {exc.name}: {exc.description}")
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # Allow of a 405
        return response

    @app.errorhandler(Exception)
    def crash(exc: Exception):
        log.exception("error answering %s %s", request.method, request.path[:80])
        return answer(500, 2, f"internal error ({exc.__class__.__name__}); see the server's log")
