"""Clients the integration tests drive: a wire-level Socket.IO client and the real pyqlib client."""

from __future__ import annotations

import json
import pickle
import queue
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import socketio

PYQLIB_VERSION = "0.9.7"


class WireClient:
    """One Socket.IO connection speaking the Qlib wire protocol; one request at a time per type."""

    def __init__(self, url: str, auth: dict | None = None):
        self.sio = socketio.Client(reconnection=False)
        self.responses: dict[str, queue.Queue] = {}
        for kind in ("calendar", "instrument", "feature", "unknown", "error"):
            q = self.responses[kind] = queue.Queue()
            self.sio.on(f"{kind}_response", lambda msg, q=q: q.put(msg))
        self.sio.connect(url, transports=["websocket"], auth=auth, wait_timeout=10)

    def send(self, kind: str, body: Any, encoding: str = "json", version: str = PYQLIB_VERSION,
             event: str | None = None) -> None:
        if encoding == "json":
            body = json.dumps(body, default=str)
        elif encoding == "pickle":
            body = pickle.dumps(body)
        self.sio.emit(event or f"{kind}_request", {"head": {"version": version}, "body": body})

    def receive(self, kind: str, timeout: float = 60.0) -> dict:
        return self.responses[kind].get(timeout=timeout)

    def request(self, kind: str, body: Any, encoding: str = "json", timeout: float = 60.0, **kw) -> dict:
        self.send(kind, body, encoding, **kw)
        return self.receive(kind, timeout)

    def close(self) -> None:
        self.sio.disconnect()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PYQLIB_PRELUDE = """
import pickle, sys
import qlib
from qlib.data import D
qlib.init(default_conf="client", provider_uri={provider_uri!r}, flask_server="127.0.0.1", flask_port={port},
          calendar_provider={{"class": "LocalCalendarProvider", "kwargs": {{"remote": True}}}},
          instrument_provider="ClientInstrumentProvider", dataset_provider="ClientDatasetProvider",
          provider="ClientProvider", logging_level="ERROR", timeout=120)
"""


def run_pyqlib(script: str, port: int, provider_uri: Path, timeout: float = 180.0) -> Any:
    """Run ``script`` with the real pyqlib ``ClientProvider`` in a subprocess; return what it assigns
    to ``result`` (pickled back through stdout)."""
    code = PYQLIB_PRELUDE.format(provider_uri=str(provider_uri), port=port) + textwrap.dedent(script) + \
        "\nsys.stdout.buffer.write(b'RESULT:' + pickle.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout)
    marker = done.stdout.find(b"RESULT:")
    if done.returncode != 0 or marker < 0:
        raise AssertionError(f"pyqlib client failed ({done.returncode}):\n"
                             f"{done.stderr.decode(errors='replace')[-3000:]}")
    return pickle.loads(done.stdout[marker + len(b"RESULT:"):])


def local_qlib(script: str, provider_uri: Path, timeout: float = 180.0) -> Any:
    """Run ``script`` with Qlib reading ``provider_uri`` locally (no server); return its ``result``."""
    code = textwrap.dedent(f"""
        import pickle, sys
        import qlib
        from qlib.data import D
        qlib.init(provider_uri={str(provider_uri)!r}, region="cn", logging_level="ERROR")
    """) + textwrap.dedent(script) + "\nsys.stdout.buffer.write(b'RESULT:' + pickle.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout)
    marker = done.stdout.find(b"RESULT:")
    if done.returncode != 0 or marker < 0:
        raise AssertionError(f"local qlib failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    return pickle.loads(done.stdout[marker + len(b"RESULT:"):])


SERVER_CLIENT_PRELUDE = """
import pickle, sys
import qlib
from qlib.data import D
from qlib_server.client import client_config
qlib.init(**client_config("127.0.0.1", {port}, timeout=120, delivery={delivery!r}), provider_uri={provider_uri!r},
          region="cn", logging_level="ERROR")
"""


def run_server_client(script: str, port: int, provider_uri: Path | None, timeout: float = 300.0,
                      delivery: str = "auto") -> Any:
    """Run ``script`` with Qlib wired to the server by :func:`qlib_server.client.client_config` in a
    subprocess (``provider_uri`` None: left unset; ``delivery`` of feature rows: on this host, ``auto`` maps the
    cache files); return what it assigns to ``result``."""
    prelude = SERVER_CLIENT_PRELUDE.format(port=port, provider_uri=str(provider_uri), delivery=delivery)
    if provider_uri is None:
        prelude = prelude.replace("provider_uri='None', ", "")
    code = prelude + textwrap.dedent(script) + "\nsys.stdout.buffer.write(b'RESULT:' + pickle.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout)
    marker = done.stdout.find(b"RESULT:")
    if done.returncode != 0 or marker < 0:
        raise AssertionError(f"qlib_server.client failed ({done.returncode}):\n"
                             f"{done.stderr.decode(errors='replace')[-3000:]}")
    return pickle.loads(done.stdout[marker + len(b"RESULT:"):])
