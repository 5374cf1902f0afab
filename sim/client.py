"""Speaking the Qlib wire protocol over Socket.IO, asynchronously and synchronously.

A request event is ``<kind>_request`` with ``{"head": {"version": ...}, "body": BODY}``; BODY is
``pickle.dumps(body)`` (released pyqlib 0.9.x) or a JSON string (Qlib's main branch). The answer comes
back as ``<kind>_response`` without a request id, so a connection has at most one request of each kind
in flight. After a timeout the late answer still arrives on that connection: the helpers here drop it,
and callers that want a clean slate reconnect.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import queue
import random
import re
import threading
import urllib.request
from typing import Any

import socketio

from .universe import KINDS

PYQLIB_VERSION = "0.9.7"
ENCODINGS = ("json", "pickle", "dict")


def encode_body(body: dict, encoding: str) -> Any:
    """The body as a client sends it: pickle bytes, JSON text, or the mapping itself."""
    if encoding == "pickle":
        return pickle.dumps(body)
    if encoding == "json":
        return json.dumps(body, default=str)
    if encoding == "dict":
        return body
    raise ValueError(f"unknown body encoding {encoding!r} (one of {', '.join(ENCODINGS)})")


def payload(body: dict, encoding: str, version: str = PYQLIB_VERSION) -> dict:
    """The whole request event: head with the client version, and the encoded body."""
    return {"head": {"version": version}, "body": encode_body(body, encoding)}


def pick_encoding(encoding: str, rng: random.Random) -> str:
    """``mixed`` chooses pickle or JSON per request; anything else is used as is."""
    return rng.choice(("pickle", "json")) if encoding == "mixed" else encoding


class _Slots:
    """The answer slot of each request kind on one connection, plus how many late answers to drop."""

    def __init__(self, make_slot):
        self.slots = {kind: make_slot() for kind in KINDS}
        self.stale = {kind: 0 for kind in KINDS}
        self.lock = threading.Lock()

    def take_stale(self, kind: str) -> bool:
        with self.lock:
            if self.stale[kind]:
                self.stale[kind] -= 1
                return True
            return False

    def mark_stale(self, kind: str) -> None:
        with self.lock:
            self.stale[kind] += 1


# -- asyncio ---------------------------------------------------------------------------------------
def _async_slots(sio: socketio.AsyncClient) -> _Slots:
    slots = getattr(sio, "_qlib_slots", None)
    if slots is None:
        slots = sio._qlib_slots = _Slots(lambda: None)
        for kind in KINDS:
            sio.on(f"{kind}_response", _async_handler(slots, kind))
    return slots


def _async_handler(slots: _Slots, kind: str):
    async def on_response(message=None, *_):
        if slots.take_stale(kind):
            return
        future, slots.slots[kind] = slots.slots[kind], None
        if future is not None and not future.done():
            future.set_result(message)
    return on_response


async def connect(url: str, timeout: float = 30.0, token: str | None = None, **kwargs) -> socketio.AsyncClient:
    """A new AsyncClient connected over the websocket transport (with the server's ``token``, if it has
    one), ready for :func:`request`."""
    sio = socketio.AsyncClient(reconnection=False, **kwargs)
    _async_slots(sio)
    await sio.connect(url, transports=["websocket"], wait_timeout=timeout, auth={"token": token} if token else None)
    return sio


async def request(sio: socketio.AsyncClient, kind: str, body: dict, encoding: str = "json",
                  timeout: float = 60.0) -> dict:
    """Send one request and await its ``<kind>_response``; raise ``asyncio.TimeoutError`` after ``timeout``."""
    slots = _async_slots(sio)
    if slots.slots[kind] is not None:
        raise RuntimeError(f"a {kind} request is already in flight on this connection")
    future = slots.slots[kind] = asyncio.get_running_loop().create_future()
    try:
        await sio.emit(f"{kind}_request", payload(body, encoding))
        return await asyncio.wait_for(future, timeout)
    except BaseException:
        if slots.slots[kind] is future:
            slots.slots[kind] = None
            if future.cancelled() or not future.done():
                slots.mark_stale(kind)
        raise


# -- threads ---------------------------------------------------------------------------------------
def _sync_slots(sio: socketio.Client) -> _Slots:
    slots = getattr(sio, "_qlib_slots", None)
    if slots is None:
        slots = sio._qlib_slots = _Slots(lambda: queue.Queue(maxsize=1))
        for kind in KINDS:
            sio.on(f"{kind}_response", _sync_handler(slots, kind))
    return slots


def _sync_handler(slots: _Slots, kind: str):
    def on_response(message=None, *_):
        if not slots.take_stale(kind):
            slots.slots[kind].put(message)
    return on_response


def connect_sync(url: str, timeout: float = 30.0, **kwargs) -> socketio.Client:
    """A new blocking Client connected over the websocket transport, ready for :func:`request_sync`."""
    sio = socketio.Client(reconnection=False, **kwargs)
    _sync_slots(sio)
    sio.connect(url, transports=["websocket"], wait_timeout=timeout)
    return sio


def request_sync(sio: socketio.Client, kind: str, body: dict, encoding: str = "json", timeout: float = 60.0) -> dict:
    """Blocking :func:`request`: raise ``TimeoutError`` when no answer comes within ``timeout``."""
    slots = _sync_slots(sio)
    sio.emit(f"{kind}_request", payload(body, encoding))
    try:
        return slots.slots[kind].get(timeout=timeout)
    except queue.Empty:
        slots.mark_stale(kind)
        raise TimeoutError(f"no {kind}_response within {timeout} s") from None


# -- server metrics --------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def fetch_metrics(server: str, timeout: float = 10.0, token: str | None = None) -> dict[str, dict[tuple, float]]:
    """``GET /metrics`` (with the server's ``token``, if it has one) parsed to
    ``{name: {((label, value), ...): sample}}``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(server.rstrip("/") + "/metrics", headers=headers),
                                timeout=timeout) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or "")))
        out.setdefault(match["name"], {})[labels] = float(match["value"])
    return out


def metric_by_type(metrics: dict, name: str) -> dict[str, float]:
    """Sum of one counter's samples per ``type`` label."""
    out: dict[str, float] = {}
    for labels, value in metrics.get(name, {}).items():
        kind = dict(labels).get("type", "")
        out[kind] = out.get(kind, 0.0) + value
    return out
