"""``python -m tests.qlib_suite QLIB_TESTS_DIR [options]``: Qlib's own data-layer tests, locally and
through an embedded Qlib-Server, every answer of Qlib's data providers compared.

Qlib's tests are not part of this repository (nor of the ``pyqlib`` wheel): give the ``tests/``
directory of Qlib's source at the pinned version (``QLIB_TESTS`` in the environment works too).

Steps: generate a dataset the tests can run on (:mod:`tests.qlib_suite.dataset`); start
``python -m qlib_server serve --embedded`` on it with nothing but its ``provider_uri`` and port set;
run the chosen test files with pytest twice, each in a subprocess with the plugin
(:mod:`tests.qlib_suite.plugin`) and a copy of the tests of its own (the tests write files beside
themselves and in their working directory): once with local Qlib, once with every ``qlib.init``
wired to the server; compare the two recordings answer by answer and print a table. Exit status 0
when every test that can run through a server ended as it did locally with equal answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from .compare import compare, table, verdict
from .dataset import generate_qlib_test_data

ROOT = Path(__file__).resolve().parents[2]
QLIB_VERSION = "0.9.7"
#: the data-layer tests (paths under Qlib's ``tests/``)
DEFAULT_FILES = (
    "data_mid_layer_tests/test_dataloader.py",
    "data_mid_layer_tests/test_dataset.py",
    "data_mid_layer_tests/test_handler.py",
    "data_mid_layer_tests/test_handler_storage.py",
    "data_mid_layer_tests/test_processor.py",
    "dataset_tests/test_datalayer.py",
    "ops/test_elem_operator.py",
    "ops/test_special_ops.py",
    "rolling_tests/test_update_pred.py",
    "misc/test_get_multi_proc.py",
    "misc/test_index_data.py",
    "storage_tests/test_storage.py",
    "test_register_ops.py",
    "test_workflow.py",
    "test_all_pipeline.py",
)
#: tests that cannot run through a server (node id prefix: why); they run in both modes all the same
CANNOT = {
    "test_register_ops.py": "its operators (Diff, Distance) are registered by qlib.init(custom_ops=...) in the "
                            "client's process only; the server parses the fields with the operators it knows "
                            "(its own custom_ops setting)",
    "ops/test_elem_operator.py::TestElementOperator": "TestMockData: the calendar, instruments and features come "
                                                      "from mock storage classes (qlib.tests.MOCK_DF) in the "
                                                      "client's process, which qlib.init is given as providers",
    "ops/test_elem_operator.py::TestInstElementOperator": "calls DatasetProvider.inst_calculator, which computes "
                                                          "expressions in the client's process (ExpressionD over "
                                                          "FeatureD, reading the data files); a server client "
                                                          "has no files",
    "storage_tests/test_storage.py": "reads Qlib's file storage classes (FileCalendarStorage, ...) on a "
                                     "provider_uri directly, not through Qlib's providers",
}
MISSING = f"""Qlib's tests are needed: the tests/ directory of Qlib's source at v{QLIB_VERSION} (the pyqlib wheel
has none, and this repository does not carry them). Get them with, for example:

    git clone --depth 1 --branch v{QLIB_VERSION} https://github.com/microsoft/qlib /tmp/qlib-{QLIB_VERSION}

or, from a local clone or mirror, `git -C QLIB_GIT_DIR archive v{QLIB_VERSION} tests | tar -x -C DIR`; then

    nox -s qlib_tests -- /tmp/qlib-{QLIB_VERSION}/tests      (or QLIB_TESTS=... nox -s qlib_tests)
    python -m tests.qlib_suite /tmp/qlib-{QLIB_VERSION}/tests
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """``python -m qlib_server serve -c CFG --embedded`` on ``data``: its defaults but for where the data
    is and which port it listens on."""

    def __init__(self, data: Path, directory: Path):
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "server.yaml"
        config.write_text(yaml.safe_dump({"provider_uri": str(data), "flask_server": "127.0.0.1",
                                          "flask_port": self.port}))
        self.log_path = directory / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlib_server", "serve", "-c", str(config),
                                          "--embedded"], stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                         env={**os.environ, "PYTHONPATH": pythonpath()})

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the embedded server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the embedded server was not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_tests(mode: str, qlib_tests: Path, files: list[str], data: Path, work: Path, server: str = "",
              timeout: float = 7200.0, extra: list[str] = ()) -> tuple[Path, float]:
    """Qlib's ``files`` with pytest in a subprocess, in ``work/mode`` (a copy of the tests, the pytest
    output in ``pytest.log``); return the recording's directory and the seconds taken."""
    directory = work / mode
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(qlib_tests, directory / "tests")
    env = {**os.environ, "PYTHONPATH": pythonpath(), "QLIB_SUITE_MODE": mode, "QLIB_SUITE_DATA": str(data),
           "QLIB_SUITE_SERVER": server, "QLIB_SUITE_OUT": str(directory / "out"), "HOME": str(directory / "home"),
           "MLFLOW_ALLOW_FILE_STORE": "true",  # Qlib's recorders use mlflow's file store (deprecated in mlflow 3)
           "PYTHONHASHSEED": "0"}  # Qlib builds some field lists from sets: both runs ask in one order
    (directory / "home").mkdir()  # nothing of the user's ~/.qlib or ~/.mlruns is read or written
    command = [sys.executable, "-m", "pytest", "-p", "tests.qlib_suite.plugin", "-p", "no:cacheprovider",
               "-p", "no:randomly", "--rootdir", str(directory / "tests"), "-o", "timeout=0", "-rA", "-q",
               *extra, *(str(Path("tests") / f) for f in files)]
    started = time.monotonic()
    with open(directory / "pytest.log", "wb") as log:
        subprocess.run(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    took = time.monotonic() - started
    if not (directory / "out" / "recording.json").exists():
        raise RuntimeError(f"the {mode} run recorded nothing:\n{(directory / 'pytest.log').read_text()[-3000:]}")
    return directory / "out", took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.qlib_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("qlib_tests", nargs="?", default=os.environ.get("QLIB_TESTS"),
                        help=f"the tests/ directory of Qlib's source at v{QLIB_VERSION} (default: $QLIB_TESTS)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files under it to run")
    parser.add_argument("--work", type=Path, help="working directory (kept; default: a temporary one, removed)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. \"-k 'not pipeline'\"")
    args = parser.parse_args(argv)
    if not args.qlib_tests or not (Path(args.qlib_tests) / "conftest.py").exists() and \
            not (Path(args.qlib_tests) / "data_mid_layer_tests").is_dir():
        print(f"No Qlib tests directory given or found ({args.qlib_tests!r}).\n\n{MISSING}", file=sys.stderr)
        return 2
    qlib_tests = Path(args.qlib_tests).resolve()
    missing = [f for f in args.files if not (qlib_tests / f).exists()]
    if missing:
        print(f"Not in {qlib_tests}: {', '.join(missing)}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="qlib-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = args.pytest_args.split() if args.pytest_args else []
    try:
        data = work / "data"
        if not (data / "calendars" / "day.txt").exists():
            print(f"generating the dataset in {data}", flush=True)
            generate_qlib_test_data(data)
        server = EmbeddedServer(data, work / "server-process")
        try:
            server.wait_ready()
            print(f"embedded server on port {server.port}; local run ...", flush=True)
            local_out, local_s = run_tests("local", qlib_tests, args.files, data, work, extra=extra)
            print(f"local run: {local_s:.0f} s; server run ...", flush=True)
            server_out, server_s = run_tests("server", qlib_tests, args.files, data, work,
                                             server=f"127.0.0.1:{server.port}", extra=extra)
            print(f"server run: {server_s:.0f} s", flush=True)
        finally:
            server.stop()
        rows = compare(local_out, server_out, CANNOT)
        report = table(rows)
        (work / "report.md").write_text(report + "\n")
        print(report)
        ok = verdict(rows)
        kept = f"in {work}" if args.work else "removed (--work DIR keeps them)"
        print(f"\n{'OK' if ok else 'DIFFERENCES'}: {sum(r.compared for r in rows)} answers compared, "
              f"{sum(r.differing for r in rows)} differing; pytest logs, recordings and report.md {kept}")
        return 0 if ok else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
