"""The demo: a generated dataset, a running Qlib-Server, real pyqlib clients and the simulator.

    python -m sim.demo [--distributed] [--clients 300] [--duration 15]

Embedded by default (no RabbitMQ, no Redis); ``--distributed`` runs ``qlib-server serve`` on the
RabbitMQ and Redis at 127.0.0.1 instead.
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from qlib_server.datagen import generate_dataset

CLIENT_SCRIPT = """
import pickle, sys, time
import qlib
from qlib.data import D
from qlib.data.client import Client
from qlib.data.data import ClientCalendarProvider
from qlib.data.filter import NameDFilter
qlib.init(default_conf="client", provider_uri={data!r}, flask_server="127.0.0.1", flask_port={port},
          calendar_provider={{"class": "LocalCalendarProvider", "kwargs": {{"remote": True}}}},
          instrument_provider="ClientInstrumentProvider", dataset_provider="ClientDatasetProvider",
          provider="ClientProvider", logging_level="ERROR")
out = []
def timed(name, call):
    t = time.perf_counter(); value = call(); out.append((name, time.perf_counter() - t, value))
cal = ClientCalendarProvider(); cal.set_conn(Client("127.0.0.1", {port}))
timed("calendar 2019 (ClientCalendarProvider)", lambda: cal.calendar("2019-01-01", "2019-12-31", "day"))
timed("list_instruments csi300 as list", lambda: D.list_instruments(D.instruments("csi300"), as_list=True))
timed("list_instruments csi300 spans", lambda: D.list_instruments(D.instruments("csi300")))
pipe = [NameDFilter(name_rule_re="SH.*").to_config()]
timed("list_instruments csi300 + NameDFilter(SH.*)",
      lambda: D.list_instruments(D.instruments("csi300", filter_pipe=pipe), as_list=True))
fields = ["$close", "Mean($close, 5)", "Ref($close, 1) / $close - 1", "Std($volume, 20)"]
timed("features csi300 x 4 fields, disk_cache=1 (cold)",
      lambda: D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30", disk_cache=1))
timed("features csi300 x 4 fields, disk_cache=1 (hot)",
      lambda: D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30", disk_cache=1))
timed("features 3 codes, disk_cache=0", lambda: D.features(["SH600000", "SZ000001", "SH600002"], fields[:2],
      "2019-01-01", "2019-03-01", disk_cache=0))
sys.stdout.buffer.write(b"RESULT:" + pickle.dumps(out))
"""

NEW_CLIENT_SCRIPT = """
import pickle, sys, tempfile, time
import qlib
from qlib.data import D
from qlib.data.filter import NameDFilter
from qlib_server.client import client_config
qlib.init(**client_config("127.0.0.1", {port}, delivery={delivery!r}), provider_uri=tempfile.mkdtemp(), region="cn",
          logging_level="ERROR")
out = []
def timed(name, call):
    t = time.perf_counter(); value = call(); out.append((name, time.perf_counter() - t, value))
timed("calendar", lambda: D.calendar("2019-01-01", "2019-12-31", "day"))
timed("list", lambda: D.list_instruments(D.instruments("csi300"), as_list=True))
timed("spans", lambda: D.list_instruments(D.instruments("csi300")))
pipe = [NameDFilter(name_rule_re="SH.*").to_config()]
timed("filter", lambda: D.list_instruments(D.instruments("csi300", filter_pipe=pipe), as_list=True))
fields = ["$close", "Mean($close, 5)", "Ref($close, 1) / $close - 1", "Std($volume, 20)"]
timed("cold", lambda: D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30", disk_cache=1))
timed("hot", lambda: D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30", disk_cache=1))
timed("codes", lambda: D.features(["SH600000", "SZ000001", "SH600002"], fields[:2], "2019-01-01", "2019-03-01",
                                  disk_cache=0))
sys.stdout.buffer.write(b"RESULT:" + pickle.dumps(out))
"""

LOCAL_SCRIPT = """
import pickle, sys
import qlib
from qlib.data import D
from qlib.data.filter import NameDFilter
qlib.init(provider_uri={data!r}, region="cn", logging_level="ERROR")
pipe = [NameDFilter(name_rule_re="SH.*").to_config()]
fields = ["$close", "Mean($close, 5)", "Ref($close, 1) / $close - 1", "Std($volume, 20)"]
out = [D.calendar("2019-01-01", "2019-12-31", "day"), D.list_instruments(D.instruments("csi300"), as_list=True),
       D.list_instruments(D.instruments("csi300")),
       D.list_instruments(D.instruments("csi300", filter_pipe=pipe), as_list=True),
       D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30"),
       D.features(D.instruments("csi300"), fields, "2019-01-01", "2020-06-30"),
       D.features(["SH600000", "SZ000001", "SH600002"], fields[:2], "2019-01-01", "2019-03-01")]
sys.stdout.buffer.write(b"RESULT:" + pickle.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_line(url: str) -> str:
    """A few figures of the server's status page (its ``/status.json``)."""
    with urllib.request.urlopen(f"{url}/status.json", timeout=10) as reply:
        view = json.load(reply)
    total = view["totals"]

    def summed(name: str) -> int:
        return int(sum(v for k, v in total.items() if k == name or k.startswith(name + "{")))

    return (f"{len(view['handlers'])} handler(s), {len(view['processors'])} processor(s), "
            f"{summed('qlib_server_requests_total')} requests, {summed('qlib_server_cache_hits_total')} cache hits, "
            f"{summed('qlib_server_dedup_hits_total')} dedup hits, {summed('qlib_server_processor_tasks_total')} tasks "
            f"computed, {summed('qlib_server_errors_total')} errors logged")


def _run_script(code: str) -> object:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600)
    marker = done.stdout.find(b"RESULT:")
    if done.returncode or marker < 0:
        raise SystemExit(f"client script failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return pickle.loads(done.stdout[marker + 7:])


def _same(a, b) -> bool:
    import pandas as pd

    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a.sort_index()[sorted(a.columns)], b.sort_index()[sorted(b.columns)],
                                          check_dtype=False, check_exact=False)
            return True
        except AssertionError:
            return False
    return a == b if isinstance(a, dict) else [str(x) for x in a] == [str(x) for x in b]  # lists, arrays


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited; see its log above")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distributed", action="store_true", help="use RabbitMQ and Redis at 127.0.0.1")
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--workdir", help="where to put data, config and reports (default: a temp dir)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qlib-server-demo-"))
    data = work / "data"
    print(f"== 1. generating a Qlib dataset (30 instruments x 750 days) in {data}")
    generate_dataset(data, instruments=30, days=750)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    suffix = str(port)
    config = {"provider_uri": str(data), "flask_port": port, "max_process": 2, "logging_level": "WARNING",
              "task_queue": f"demo_tasks_{suffix}", "message_queue": f"demo_results_{suffix}", "redis_task_db": 7}
    (work / "config.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    command = [sys.executable, "-m", "qlib_server", "serve", "-c", str(work / "config.yaml")]
    if not args.distributed:
        command.append("--embedded")
    mode = "distributed (RabbitMQ + Redis at 127.0.0.1)" if args.distributed else "embedded (no RabbitMQ, no Redis)"
    print(f"== 2. starting qlib-server, {mode}, on {url} (status page: {url}/)")
    server = subprocess.Popen(command)
    try:
        _wait_ready(url, server)
        print("== 3. real pyqlib clients (ClientProvider with the data mounted, pickled requests as released) beside")
        print("      qlib_server.client (no data directory; on this host it maps the server's cache files, and a")
        print("      second one has the rows streamed as a client on another host does), each vs Qlib reading locally")
        remote = _run_script(CLIENT_SCRIPT.format(data=str(data), port=port))
        mapping = _run_script(NEW_CLIENT_SCRIPT.format(port=port, delivery="auto"))
        streamed = _run_script(NEW_CLIENT_SCRIPT.format(port=port, delivery="stream"))
        local = _run_script(LOCAL_SCRIPT.format(data=str(data)))
        different = 0
        print(f"   {'request':<46} {'stock':>10} {'new':>10} {'streamed':>10}  size  identical to local (each)")
        for (name, seconds, value), mapped, sent, expected in zip(remote, mapping, streamed, local):
            size = getattr(value, "shape", None) or len(value)
            same = [_same(got, expected) for got in (value, mapped[2], sent[2])]
            different += same.count(False)
            times = " ".join(f"{t * 1000:7.1f} ms" for t in (seconds, mapped[1], sent[1]))
            print(f"   {name:<46} {times}  {size}  " + ", ".join(map(str, same)))
        print("   (pyqlib's own Socket.IO client waits ~1 s per request in its wait loop; "
              "the server's part is the rest)")
        print(f"== 4. simulator: {args.clients} fake clients for {args.duration:g}s, "
              "every answer checked against local Qlib")
        sim = subprocess.run([sys.executable, "-m", "sim", "--server", url, "--data", str(data), "--clients",
                              str(args.clients), "--duration", str(args.duration), "--json", str(work / "sim.json"),
                              "--plot", str(work / "sim.png")])
        print(f"== status page {url}/ now shows: {_status_line(url)}")
        print(f"== done: report {work / 'sim.json'}, plot {work / 'sim.png'}")
        if different:
            print(f"== FAILED: {different} client answer(s) differ from local Qlib")
        return sim.returncode or int(bool(different))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
