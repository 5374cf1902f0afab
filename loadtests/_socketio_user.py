"""A Locust User speaking Qlib-Server's Socket.IO protocol: one connection and one request in flight per user.

Each request is reported to Locust's statistics as ``request_type="socketio"``. A request fails when the
server answers with a non-zero status (the error names the status and the server's ``detailed_info``),
when no answer comes within ``QLIB_LOAD_TIMEOUT`` seconds, or when the connection drops while waiting;
after any failure but a status one the user opens a fresh connection (answers carry no request id).

Module names start with an underscore so that ``locust -f loadtests/`` does not load them as locustfiles.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from locust import User

try:  # imported as part of the loadtests package
    from ._connection import QlibConnection, ServerAnsweredError
except ImportError:  # imported by a locustfile that locust loaded as a top-level module
    from _connection import QlibConnection, ServerAnsweredError


class QlibSocketIOUser(User):
    """Base class of the scenarios: keeps one connection and reports each request/answer pair."""

    abstract = True
    #: seconds to wait for one answer (the runner sets the server's request_timeout below it)
    timeout = float(os.environ.get("QLIB_LOAD_TIMEOUT", "60"))
    #: seconds to wait for the Socket.IO handshake
    connect_timeout = 10.0

    def __init__(self, environment):
        super().__init__(environment)
        self.connection: Optional[QlibConnection] = None
        if not self.host:
            raise ValueError("no host: pass the server URL with -H http://HOST:PORT")

    def on_start(self) -> None:
        self._connect()

    def on_stop(self) -> None:
        self._close()

    def _report(self, name: str, started: float, length: int, exception: Optional[Exception]) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.environment.events.request.fire(request_type="socketio", name=name, response_time=elapsed_ms,
                                             response_length=length, exception=exception, context={})

    def _connect(self) -> bool:
        started = time.perf_counter()
        try:
            self.connection = QlibConnection(self.host, self.connect_timeout)
        except Exception as exc:  # refused, unreachable, handshake timeout
            self.connection = None
            self._report("connect", started, 0, exc)
            return False
        self._report("connect", started, 0, None)
        return True

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, kind: str, body: dict, name: Optional[str] = None) -> Any:
        """Send one request and wait for its answer; return the result, or None after a reported failure."""
        name = name or kind
        if self.connection is None and not self._connect():
            return None
        started = time.perf_counter()
        try:
            answer = self.connection.request(kind, body, self.timeout)
        except ServerAnsweredError as exc:
            self._report(name, started, 0, exc)
            return None
        except Exception as exc:  # no answer, or the emit itself failed: start afresh next time
            self._report(name, started, 0, exc)
            self._close()
            return None
        result = answer.get("result")
        length = len(json.dumps(result, separators=(",", ":")))
        if answer["status"] != 0:
            failure = ServerAnsweredError(f"status {answer['status']}: {answer.get('detailed_info')}")
            self._report(name, started, length, failure)
            return None
        self._report(name, started, length, None)
        return result
