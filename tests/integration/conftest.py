"""Integration fixtures: RabbitMQ and Redis the tests own, a dataset, and servers as subprocesses.

Services come from ``QLIB_TEST_AMQP_URL`` / ``QLIB_TEST_REDIS_URL`` when set (bring your own), else
from testcontainers (image ``QLIB_TEST_SERVICES_IMAGE``, or the official ``rabbitmq`` and ``redis``
images). Containers get fixed host ports, so a test may stop and restart them. A
missing Docker engine (and no QLIB_TEST_*_URL) fails the run: nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pytest
import redis
import requests
import yaml

from qlib_server.datagen import generate_dataset

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the thing polled is not up yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Services:
    """Where the test RabbitMQ and Redis listen, and the containers behind them (if any)."""

    amqp_host: str
    amqp_port: int
    redis_host: str
    redis_port: int
    rabbitmq: object = None
    redis: object = None
    _next_db: list = field(default_factory=lambda: [1])

    def redis_client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host=self.redis_host, port=self.redis_port, db=db)

    def fresh_db(self) -> int:
        """A Redis database no other server of this session uses (flushed)."""
        db = self._next_db[0]
        self._next_db[0] = db % 15 + 1
        self.redis_client(db).flushdb()
        return db

    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.amqp_host}:{self.amqp_port}/%2F"


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _start_containers() -> Services:
    from testcontainers.community.rabbitmq import RabbitMqContainer
    from testcontainers.community.redis import RedisContainer

    image = os.environ.get("QLIB_TEST_SERVICES_IMAGE")
    amqp_port, redis_port = free_port(), free_port()
    rabbit = RabbitMqContainer(image=image or "rabbitmq:3.13").with_bind_ports(5672, amqp_port)
    if image:
        rabbit = rabbit.with_command("rabbitmq-server")
    red = RedisContainer(image=image or "redis:7").with_bind_ports(6379, redis_port)
    red.start()
    try:
        rabbit.start()
    except Exception:
        red.stop()
        raise
    return Services("127.0.0.1", amqp_port, "127.0.0.1", redis_port, rabbit, red)


@pytest.fixture(scope="session")
def services():
    amqp, red = os.environ.get("QLIB_TEST_AMQP_URL"), os.environ.get("QLIB_TEST_REDIS_URL")
    if amqp and red:
        a, r = urlparse(amqp), urlparse(red)
        yield Services(a.hostname, a.port or 5672, r.hostname, r.port or 6379)
        return
    if not _docker_available():
        pytest.fail("integration tests need Docker (run ../shared/testcontainers/setup) or "
                    "QLIB_TEST_AMQP_URL and QLIB_TEST_REDIS_URL")
    svc = _start_containers()
    try:
        yield svc
    finally:
        svc.rabbitmq.stop()
        svc.redis.stop()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A synthetic Qlib dataset shared by the session (30 instruments, 3 years)."""
    return generate_dataset(tmp_path_factory.mktemp("qlib_data"), instruments=30, days=750)


@dataclass
class ServerProcess:
    """A ``qlib-server serve`` subprocess and what a test needs to talk to it."""

    config: dict
    config_path: Path
    log_path: Path
    proc: subprocess.Popen

    @property
    def port(self) -> int:
        return self.config["flask_port"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value} (read with the server's token when it has one)."""
        token = self.config.get("auth_token")
        reply = requests.get(f"{self.url}/metrics", timeout=5,
                             headers={"Authorization": f"Bearer {token}"} if token else {})
        reply.raise_for_status()
        text = reply.text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str, **labels) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{wanted}}}" if labels else name
        return self.metrics().get(key, 0.0)

    def ready(self, processors: bool = True) -> bool:
        """``/readyz`` says ready; with ``processors=False`` only the handler's own checks count."""
        try:
            reply = requests.get(f"{self.url}/readyz", timeout=2)
        except requests.RequestException:
            return False
        if processors:
            return reply.status_code == 200
        checks = reply.json()
        return bool(checks.get("redis") and checks.get("broker") and checks.get("consuming"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start_server(services, dataset, tmp_path):
    """Factory: start a server (both modules unless ``modules`` says otherwise) and wait until ready."""
    started: list[ServerProcess] = []
    shared = {}

    def start(modules=("request_handler", "data_processor"), wait: bool = True, **overrides) -> ServerProcess:
        if "redis_task_db" not in shared:
            shared["redis_task_db"] = services.fresh_db()
            suffix = uuid.uuid4().hex[:8]
            shared["task_queue"], shared["message_queue"] = f"tasks-{suffix}", f"results-{suffix}"
        config = {
            "provider_uri": str(dataset), "region": "cn", "flask_server": "127.0.0.1", "flask_port": free_port(),
            "queue_host": services.amqp_host, "queue_port": services.amqp_port,
            "redis_host": services.redis_host, "redis_port": services.redis_port,
            "max_process": 2, "logging_level": "INFO", **shared, **overrides,
        }
        n = len(started)
        config_path = tmp_path / f"server{n}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / f"server{n}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config_path), "-m",
                                     *modules],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        server = ServerProcess(config, config_path, log_path, proc)
        started.append(server)
        if wait and "request_handler" in modules:
            both = "data_processor" in modules
            try:
                wait_until(lambda: server.ready(both) or proc.poll() is not None, 90, what="server ready")
            except AssertionError:
                raise AssertionError(f"server did not become ready:\n{server.log()[-3000:]}") from None
            assert proc.poll() is None, f"server exited:\n{server.log()[-3000:]}"
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """One server running both modules."""
    return start_server()
