"""Runner behind ``python -m loadtests``: a dataset, a server, a headless Locust run, a summary, clean-up.

Distributed (the default): RabbitMQ and Redis come from ``QLIB_LOAD_AMQP_HOST``/``_PORT``/``_USER``/``_PASSWORD`` and
``QLIB_LOAD_REDIS_HOST``/``_PORT``/``_DB`` (defaults: 127.0.0.1:5672 guest/guest, 127.0.0.1:6379 db 6).
The server gets queues of its own (deleted afterwards); the Redis database is reserved for load runs: the
runner clears this server's keys (``qlib_server:*``) in it before and after the run. Exit status 1 when
any request failed or none was made. ``--embedded`` runs ``qlib-server serve --embedded`` instead (no
RabbitMQ, no Redis). ``--start`` and ``--markets`` shape the generated dataset (e.g. ``--start 2012-01-02
--markets all``: dates in 2012-2015 and no market but ``all``); the scenarios find out what it holds.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SCENARIOS = ("HotUser", "ColdUser", "MixUser")


def warm_up_requests(days: list[str]) -> list[tuple[str, dict]]:
    """One calendar (light workers) and one feature request (feature workers) that no scenario makes."""
    return [("calendar", {"start_time": days[0], "end_time": days[min(len(days), 20) - 1], "freq": "day",
                          "future": False}),
            ("feature", {"instruments": {"market": "all", "filter_pipe": []}, "fields": ["$close"], "disk_cache": 0})]


def dataset_markets(names: str, instruments: int) -> dict[str, int]:
    """``--markets csi300,csi100`` → the markets besides ``all`` (always written) and their sizes."""
    sizes = (max(1, instruments * 3 // 4), max(1, instruments // 4))
    extra = [name for name in names.replace(",", " ").split() if name != "all"]
    return {name: sizes[i] if i < len(sizes) else max(1, instruments // 2) for i, name in enumerate(extra)}


@dataclass
class Services:
    """Where the load run's RabbitMQ and Redis are."""

    amqp_host: str
    amqp_port: int
    amqp_user: str
    amqp_password: str
    redis_host: str
    redis_port: int
    redis_db: int

    @classmethod
    def from_env(cls) -> Services:
        env = os.environ.get
        return cls(env("QLIB_LOAD_AMQP_HOST", "127.0.0.1"), int(env("QLIB_LOAD_AMQP_PORT", "5672")),
                   env("QLIB_LOAD_AMQP_USER", "guest"), env("QLIB_LOAD_AMQP_PASSWORD", "guest"),
                   env("QLIB_LOAD_REDIS_HOST", "127.0.0.1"), int(env("QLIB_LOAD_REDIS_PORT", "6379")),
                   int(env("QLIB_LOAD_REDIS_DB", "6")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def server_config(services: Services, provider_uri: Path, port: int, args: argparse.Namespace) -> dict:
    """A config with queues of its own; the server answers a stuck request before the client gives up."""
    suffix = uuid.uuid4().hex[:8]
    client_timeout = float(os.environ.get("QLIB_LOAD_TIMEOUT", "60"))
    if args.embedded:
        return {"provider_uri": str(provider_uri), "region": "cn", "flask_server": "127.0.0.1", "flask_port": port,
                "max_process": args.max_process, "request_timeout": max(5.0, client_timeout - 10),
                "task_timeout": 120.0, "logging_level": "WARNING"}
    return {
        "provider_uri": str(provider_uri), "region": "cn", "flask_server": "127.0.0.1", "flask_port": port,
        "queue_host": services.amqp_host, "queue_port": services.amqp_port, "queue_user": services.amqp_user,
        "queue_pwd": services.amqp_password, "task_queue": f"load-tasks-{suffix}",
        "message_queue": f"load-results-{suffix}", "redis_host": services.redis_host,
        "redis_port": services.redis_port, "redis_task_db": services.redis_db, "max_process": args.max_process,
        "request_timeout": max(5.0, client_timeout - 10), "task_timeout": 120.0, "logging_level": "WARNING",
    }


def clear_server_keys(services: Services) -> int:
    """Delete the keys a qlib-server writes (waiting lists) from the run's Redis database."""
    import redis

    client = redis.Redis(host=services.redis_host, port=services.redis_port, db=services.redis_db)
    keys = list(client.scan_iter(match="qlib_server:*", count=500))
    if keys:
        client.delete(*keys)
    client.close()
    return len(keys)


def delete_queues(services: Services, config: dict) -> None:
    """Remove the run's queues from RabbitMQ (deleting a queue that does not exist is not an error)."""
    import pika

    params = pika.ConnectionParameters(services.amqp_host, services.amqp_port,
                                       credentials=pika.PlainCredentials(services.amqp_user, services.amqp_password))
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        task_queue = config["task_queue"]
        for queue in (task_queue, f"{task_queue}.light", f"{task_queue}.dead", config["message_queue"]):
            channel.queue_delete(queue)
    finally:
        connection.close()


class Server:
    """A ``qlib-server serve`` subprocess, in a process group of its own with its processor and workers."""

    def __init__(self, config_path: Path, log_path: Path, url: str, embedded: bool = False):
        self.url = url
        self.log_path = log_path
        command = [sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path)] + ["--embedded"] * embedded
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=config_path.parent,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if http_get(f"{self.url}/readyz", 2.0)[0] == 200:
                    return True
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM, then wait for the whole group; kill what is left after ``timeout`` and say so."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        while self._group_alive() and time.monotonic() - started < timeout:
            self.proc.poll()  # reap the leader so that it leaves the group
            time.sleep(0.2)
        if self._group_alive():
            print(f"the server did not stop within {timeout:g}s of SIGTERM; killing its process group",
                  file=sys.stderr)
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            print(f"server stopped in {time.monotonic() - started:.1f}s")
        self.proc.wait(10)


def warm_up(url: str, days: list[str], timeout: float = 120.0) -> None:
    """Wait for one answer through each kind of worker, so the run does not time the workers' start-up."""
    from ._connection import QlibConnection

    connection = QlibConnection(url, 10.0)
    try:
        for kind, body in warm_up_requests(days):
            answer = connection.request(kind, body, timeout)
            if answer["status"] != 0:
                raise RuntimeError(f"warm-up {kind} request: status {answer['status']}: {answer['detailed_info']}")
    finally:
        connection.close()


def run_locust(url: str, csv_prefix: Path, args: argparse.Namespace, log_path: Path) -> int:
    command = [sys.executable, "-m", "locust", "-f", str(HERE), "--headless", "-H", url, "-u", str(args.users),
               "-r", str(args.spawn_rate), "-t", args.time, "--only-summary", "--csv", str(csv_prefix),
               *args.scenario]
    print("$", " ".join(command), flush=True)
    with open(log_path, "wb") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent).returncode


def print_choices(log_path: Path) -> None:
    """Print the lines in which the scenarios said what they chose from the server's data."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("qlib load:") or "qlib load: cannot" in line:
            print(line)


def read_stats(csv_prefix: Path) -> list[dict]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_failures(csv_prefix: Path) -> list[dict]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def print_summary(rows: list[dict], failures: list[dict]) -> tuple[int, int]:
    """Print requests, failures, median, p95 and req/s per name; return the total requests and failures."""
    header = f"{'name':<18}{'requests':>10}{'failures':>10}{'median ms':>11}{'p95 ms':>9}{'max ms':>9}{'req/s':>9}"
    print(header)
    print("-" * len(header))
    total = (0, 0)
    for row in rows:
        name = row["Name"] if row["Type"] else "total"
        count, failed = int(row["Request Count"]), int(row["Failure Count"])
        print(f"{name:<18}{count:>10}{failed:>10}{row['50%']:>11}{row['95%']:>9}"
              f"{float(row['Max Response Time']):>9.0f}{float(row['Requests/s']):>9.1f}")
        if name == "total":
            total = (count, failed)
    for failure in failures:
        print(f"FAILED {failure['Occurrences']}x {failure['Name']}: {failure['Error'][:300]}")
    return total


def read_metrics(url: str) -> dict[str, dict[str, float]]:
    """The server's counters by type: {metric name (without qlib_server_ and _total): {type: value}}."""
    out: dict[str, dict[str, float]] = {}
    for line in http_get(f"{url}/metrics")[1].splitlines():
        name, _, value = line.rpartition(" ")
        if not line.startswith("qlib_server_") or "_total{" not in name:
            continue
        metric, _, labels = name.partition("{")
        fields = dict(item.split("=", 1) for item in labels.rstrip("}").split(",") if "=" in item)
        metric = metric[len("qlib_server_"):-len("_total")]
        if "status" in fields:
            metric += "_ok" if fields["status"].strip('"') == "0" else "_err"
        kind = fields.get("type", '"-"').strip('"')
        out.setdefault(metric, {}).setdefault(kind, 0.0)
        out[metric][kind] += float(value)
    return out


def print_server_metrics(url: str) -> None:
    """Print, per request type, how the server answered: from the result cache, by joining a task, or by a task."""
    try:
        metrics = read_metrics(url)
    except OSError as exc:
        print(f"(no server metrics: {exc})")
        return
    columns = [("requests", "requests"), ("cache_hits", "cache hits"), ("dedup_hits", "dedup hits"),
               ("tasks_published", "tasks"), ("responses_ok", "answers ok"), ("responses_err", "answers err"),
               ("request_timeouts", "timeouts")]
    print(f"{'server':<11}" + "".join(f"{title:>12}" for _, title in columns))
    for kind in ("calendar", "instrument", "feature"):
        print(f"{kind:<11}" + "".join(f"{metrics.get(metric, {}).get(kind, 0):>12.0f}" for metric, _ in columns))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=25)
    parser.add_argument("--time", default="20s", help="run time, e.g. 20s, 2m")
    parser.add_argument("--scenario", nargs="*", default=[], choices=SCENARIOS,
                        help="User classes to run (default: all, by weight)")
    parser.add_argument("--instruments", type=int, default=30, help="instruments of the generated dataset")
    parser.add_argument("--days", type=int, default=750, help="trading days of the generated dataset")
    parser.add_argument("--start", default="2018-01-02", help="first day of the generated dataset")
    parser.add_argument("--markets", default="csi300,csi100",
                        help="markets of the generated dataset besides all (comma-separated; 'all' for none)")
    parser.add_argument("--embedded", action="store_true",
                        help="run the server embedded (no RabbitMQ, no Redis)")
    parser.add_argument("--max-process", type=int, default=2, help="the server's data-processor workers")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (kept anyway on failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qlib_server.datagen import generate_dataset

    services = Services.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="qlib-load-"))
    provider_uri = generate_dataset(workdir / "data", instruments=args.instruments, days=args.days, start=args.start,
                                    markets=dataset_markets(args.markets, args.instruments))
    days = (provider_uri / "calendars" / "day.txt").read_text().split()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = server_config(services, provider_uri, port, args)
    config_path = workdir / "server.yaml"
    config_path.write_text(yaml.safe_dump(config))
    stale = 0 if args.embedded else clear_server_keys(services)
    if stale:
        print(f"cleared {stale} stale qlib_server keys from redis db {services.redis_db}")

    ok = False
    server = Server(config_path, workdir / "server.log", url, args.embedded)
    try:
        if not server.wait_ready():
            print(f"the server did not become ready; its log:\n{server.log_tail()}", file=sys.stderr)
            return 1
        started = time.monotonic()
        try:
            warm_up(url, days)
        except Exception as exc:  # no answer, refused, or an error status
            print(f"the server does not answer: {exc}\n{server.log_tail()}", file=sys.stderr)
            return 1
        where = ("embedded" if args.embedded else
                 f"queues {config['task_queue']}/{config['message_queue']}, redis db {services.redis_db}")
        print(f"server ready at {url} ({where}, {args.max_process} workers; data {days[0]} .. {days[-1]}, "
              f"markets {', '.join(['all', *dataset_markets(args.markets, args.instruments)])}); warm-up took "
              f"{time.monotonic() - started:.1f}s", flush=True)
        csv_prefix = workdir / "locust"
        code = run_locust(url, csv_prefix, args, workdir / "locust.log")
        if not Path(f"{csv_prefix}_stats.csv").exists():
            log = (workdir / "locust.log").read_text(errors="replace")[-3000:]
            print(f"locust exited with {code} and wrote no statistics:\n{log}", file=sys.stderr)
            return 1
        print_choices(workdir / "locust.log")
        requests, failures = print_summary(read_stats(csv_prefix), read_failures(csv_prefix))
        print_server_metrics(url)
        ok = requests > 0 and failures == 0
        if requests == 0:
            print("no request was made", file=sys.stderr)
        return 0 if ok else 1
    finally:
        server.stop()
        try:
            if not args.embedded:
                delete_queues(services, config)
                clear_server_keys(services)
        except Exception as exc:  # leave the run's result as it is
            print(f"clean-up failed: {exc}", file=sys.stderr)
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs, statistics and dataset kept in {workdir}")
