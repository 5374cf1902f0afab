"""Real pyqlib ``ClientProvider`` processes looping over D.list_instruments / D.features during a run.

They show what an actual Qlib user sees next to the fake clients: each pyqlib call connects, sends,
and waits in Socket.IO's own loop (about a second per call). Each process initialises Qlib, then
waits for the deadline on stdin, calls until it passes, and prints its per-call timings as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from .report import percentiles

_SCRIPT = r"""
import json, sys, time, traceback
import qlib
from qlib.data import D
qlib.init(default_conf="client", provider_uri={data!r}, flask_server={host!r}, flask_port={port},
          calendar_provider={{"class": "LocalCalendarProvider", "kwargs": {{"remote": True}}}},
          instrument_provider="ClientInstrumentProvider", dataset_provider="ClientDatasetProvider",
          provider="ClientProvider", logging_level="ERROR", timeout={timeout})
calls = [
    ("list_instruments", lambda: D.list_instruments(D.instruments("csi300"), as_list=True)),
    ("list_instruments", lambda: D.list_instruments(D.instruments("all"), "2019-01-01", "2019-12-31")),
    ("features", lambda: D.features(D.instruments("csi100"), ["$close", "Mean($close, 5)"], disk_cache=1)),
    ("features", lambda: D.features(["SH600000", "SZ000001"], ["Ref($close, 1)/$close - 1"],
                                    "2018-06-01", "2019-06-01", disk_cache=1)),
]
print("READY", flush=True)
deadline = float(sys.stdin.readline())
rows, i = [], {index}
while time.time() < deadline:
    name, call = calls[i % len(calls)]
    i += 1
    t = time.perf_counter()
    try:
        result = call()
        error = None if len(result) else "empty result"
    except Exception as exc:
        error = f"{{type(exc).__name__}}: {{exc}}"[:300]
    rows.append([name, time.perf_counter() - t, error])
print("RESULT:" + json.dumps(rows), flush=True)
"""


class PyqlibDrivers:
    """``count`` pyqlib client subprocesses against ``server`` reading the dataset at ``data_dir``."""

    def __init__(self, count: int, server: str, data_dir: str, timeout: float = 60.0):
        url = urlparse(server)
        self.scripts = [_SCRIPT.format(data=str(data_dir), host=url.hostname or "127.0.0.1", port=url.port or 80,
                                       timeout=int(max(timeout, 1)), index=i) for i in range(count)]
        self.procs: list[tuple[subprocess.Popen, Path, Path]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="sim-pyqlib-")

    def start(self) -> None:
        for i, script in enumerate(self.scripts):
            out, err = Path(self.tmp.name, f"{i}.out"), Path(self.tmp.name, f"{i}.err")
            with out.open("w") as stdout, err.open("w") as stderr:
                proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=stdout,
                                        stderr=stderr, text=True)
            self.procs.append((proc, out, err))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once every process has initialised Qlib (or died, or ``timeout`` passed)."""
        end = time.time() + timeout
        while time.time() < end:
            if all(proc.poll() is not None or "READY" in _read(out) for proc, out, _ in self.procs):
                return
            time.sleep(0.2)

    def go(self, deadline: float) -> None:
        for proc, _, _ in self.procs:
            try:
                proc.stdin.write(f"{deadline}\n")
                proc.stdin.close()
            except OSError:
                pass

    def collect(self, timeout: float) -> dict:
        """Wait for every process; return call counts, errors and latency percentiles per call type."""
        latencies: dict[str, list[float]] = {}
        errors: list[str] = []
        for proc, out, err in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                errors.append("pyqlib process did not finish in time (killed)")
            text = _read(out)
            marker = text.find("RESULT:")
            if marker < 0:
                errors.append(f"pyqlib process exited {proc.returncode}: {_read(err)[-800:]}")
                continue
            for name, latency, error in json.loads(text[marker + len("RESULT:"):].splitlines()[0]):
                latencies.setdefault(name, []).append(latency)
                if error:
                    errors.append(f"{name}: {error}")
        calls = sum(len(v) for v in latencies.values())
        return {"processes": len(self.procs), "calls": calls, "errors": len(errors), "error_samples": errors[:10],
                "latency_ms": {name: {"count": len(v), **percentiles(v), "mean": round(1000 * sum(v) / len(v), 3),
                                      "max": round(1000 * max(v), 3)} for name, v in latencies.items()},
                "latencies_s": latencies}

    def stop(self) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.tmp.cleanup()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
