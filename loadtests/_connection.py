"""One Socket.IO connection speaking the Qlib wire protocol, with one request in flight at a time.

Answers carry no request id: a caller whose wait failed must close the connection and open another,
or a late answer would be taken for the answer to its next request. :meth:`QlibConnection.close` runs
in a background thread: websocket-client's close waits up to 3 s for the server's close frame inside a
bare ``except:``, which would swallow the GreenletExit that Locust stops a user with.

No Locust import here (importing locust monkey-patches the process), so the runner can use it too.
"""

from __future__ import annotations

import json
import queue
import threading

import socketio

PYQLIB_VERSION = "0.9.7"
REQUEST_TYPES = ("calendar", "instrument", "feature")
_DROPPED = object()  # put on every answer queue when the connection closes


class ServerAnsweredError(Exception):
    """The server answered with a non-zero status."""


class NoAnswerError(Exception):
    """No answer came: timed out, or the connection dropped while waiting."""


class QlibConnection:
    """One Socket.IO connection to a Qlib-Server; :meth:`request` emits one request and waits for its answer."""

    def __init__(self, url: str, connect_timeout: float):
        self.sio = socketio.Client(reconnection=False)
        self.answers: dict[str, queue.Queue] = {kind: queue.Queue() for kind in REQUEST_TYPES}
        for kind, answers in self.answers.items():
            self.sio.on(f"{kind}_response", lambda message, answers=answers: answers.put(message))
        self.sio.on("disconnect", self._dropped)
        self.sio.connect(url, transports=["websocket"], wait_timeout=connect_timeout)

    def _dropped(self, *_reason) -> None:
        for answers in self.answers.values():
            answers.put(_DROPPED)

    def request(self, kind: str, body: dict, timeout: float) -> dict:
        """Emit ``<kind>_request`` with a JSON body and return the ``<kind>_response`` envelope."""
        answers = self.answers[kind]
        self.sio.emit(f"{kind}_request", {"head": {"version": PYQLIB_VERSION}, "body": json.dumps(body)})
        try:
            answer = answers.get(timeout=timeout)
        except queue.Empty:
            raise NoAnswerError(f"no {kind}_response within {timeout:g}s") from None
        if answer is _DROPPED:
            raise NoAnswerError(f"the connection closed while waiting for {kind}_response")
        if not isinstance(answer, dict) or "status" not in answer:
            raise ServerAnsweredError(f"malformed {kind}_response: {str(answer)[:200]}")
        return answer

    def _disconnect(self) -> None:
        try:
            self.sio.disconnect()
        except Exception:  # already gone
            pass

    def close(self) -> None:
        """Disconnect without blocking the caller."""
        threading.Thread(target=self._disconnect, name="socketio-close", daemon=True).start()
