"""pytest plugin (``-p tests.qlib_suite.plugin``) loaded into a run of Qlib's own tests.

It reads its settings from the environment:

``QLIB_SUITE_MODE``   ``local`` (Qlib reads ``QLIB_SUITE_DATA``) or ``server`` (every ``qlib.init``
                      wired to the server at ``QLIB_SUITE_SERVER``, ``host:port``, by
                      :func:`qlib_server.client.client_config`, with ``provider_uri=""``)
``QLIB_SUITE_DATA``   the generated dataset (:mod:`tests.qlib_suite.dataset`)
``QLIB_SUITE_OUT``    where the recording goes: ``answers/NNNNN.pkl`` and ``recording.json``

and does three things:

* **no download**: ``GetData.qlib_data`` (what ``qlib.tests.TestAutoData`` calls to fetch Qlib's
  ``cn`` data into ``~/.qlib``) does nothing, and any other download raises;
* **one data source**: ``qlib.init`` (also as ``qlib.tests.init``) is replaced. In ``local`` mode a
  ``provider_uri`` left out, or under ``~/.qlib``, becomes ``QLIB_SUITE_DATA``; in ``server`` mode
  the providers, ``provider_uri`` and caches the test passed give way to the server's;
* **recording**: each answer Qlib's data providers give the code above them is kept, in order, under
  the test that asked. Recorded are the calls through Qlib's provider wrappers (``D``, ``Cal``,
  ``Inst``, ``DatasetD``, ``ExpressionD``) made from outside a provider: ``D.features`` (datasets,
  hence every ``DataHandler`` load), ``D.calendar``, ``D.list_instruments`` and the like. A call a
  provider makes while answering (local ``DatasetD`` asking ``Inst`` and ``Cal``, or the server
  client's ``Cal`` look-up) is not an answer to the test and differs by mode by design, so it is left
  out. Local and server runs of the same tests therefore record the same sequence of calls, and every
  answer can be compared with the other run's.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import traceback
from pathlib import Path

import pytest

MODE = os.environ.get("QLIB_SUITE_MODE", "local")
DATA = os.environ.get("QLIB_SUITE_DATA", "")
SERVER = os.environ.get("QLIB_SUITE_SERVER", "")
OUT = Path(os.environ.get("QLIB_SUITE_OUT", "qlib-suite-out"))

#: the provider wrappers of ``qlib.data`` whose answers are recorded, and the methods recorded
RECORDED = {
    "D": {"features", "calendar", "list_instruments", "feature", "expression", "dataset"},
    "Cal": {"calendar", "locate_index"},
    "Inst": {"list_instruments"},
    "DatasetD": {"dataset"},
    "ExpressionD": {"expression"},
}
#: keyword arguments of ``qlib.init`` that choose where data comes from: the server mode drops them
DATA_SOURCE = {"provider_uri", "mount_path", "calendar_provider", "instrument_provider", "feature_provider",
               "expression_provider", "dataset_provider", "provider", "pit_provider", "expression_cache",
               "dataset_cache", "calendar_cache", "flask_server", "flask_port", "default_conf"}


class Recorder:
    """The answers of one pytest run, each pickled to ``OUT/answers`` as it comes."""

    def __init__(self, out: Path):
        self.out = out
        (out / "answers").mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.outcomes: dict[str, dict] = {}
        self.test = "<collection>"
        self.depth = 0  # provider calls under way (any thread: Qlib's workers run nested calls)
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def call(self, wrapper: str, name: str, method, args, kwargs):
        if os.getpid() != self.pid:  # a process the test forked: its answers are not the test's
            return method(*args, **kwargs)
        with self.lock:
            outer = self.depth == 0
            self.depth += 1
        try:
            result = method(*args, **kwargs)
        except BaseException as exc:
            if outer:
                self.add(wrapper, name, args, kwargs, error=f"{type(exc).__name__}: {exc}"[:300])
            raise
        finally:
            with self.lock:
                self.depth -= 1
        if outer:
            self.add(wrapper, name, args, kwargs, result=result)
        return result

    def add(self, wrapper, name, args, kwargs, result=None, error=None) -> None:
        n = len(self.entries)
        entry = {"test": self.test, "n": n, "call": f"{wrapper}.{name}", "args": describe(args, kwargs),
                 "error": error, "file": None}
        if error is None:
            entry["file"] = f"answers/{n:05d}.pkl"
            with open(self.out / entry["file"], "wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
            entry["type"] = type(result).__name__
        self.entries.append(entry)

    def save(self) -> None:
        (self.out / "recording.json").write_text(json.dumps(
            {"mode": MODE, "entries": self.entries, "outcomes": self.outcomes}, indent=1, default=str))


def describe(args, kwargs) -> str:
    """A short, mode-independent account of a call's arguments (for the report)."""
    parts = [_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)[:300]


def _short(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{len(value)} items: {_short(value[0])}, ...]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


RECORDER: Recorder | None = None


def _install_recording(recorder: Recorder) -> None:
    import qlib.data.data as data
    from qlib.utils import Wrapper

    names = {id(getattr(data, name)): name for name in RECORDED}
    original = Wrapper.__getattr__

    def __getattr__(self, key):
        value = original(self, key)
        wrapper = names.get(id(self))
        if wrapper is None or key not in RECORDED[wrapper] or not callable(value):
            return value

        def recorded(*args, **kwargs):
            return recorder.call(wrapper, key, value, args, kwargs)

        return recorded

    Wrapper.__getattr__ = __getattr__


def _install_data_source() -> None:
    import qlib
    import qlib.tests
    import qlib.tests.data

    def no_download(self, *args, **kwargs):
        return None  # the generated data is in place: nothing to fetch

    def refuse(self, *args, **kwargs):
        raise RuntimeError("qlib_suite: downloads are disabled (the tests run on generated data)")

    qlib.tests.data.GetData.qlib_data = no_download
    qlib.tests.data.GetData.download_data = refuse
    qlib.tests.data.GetData.download = refuse
    for cls in (qlib.tests.TestAutoData,):
        cls.provider_uri = cls.provider_uri_1day = DATA

    real_init = qlib.init

    def default_data(uri) -> bool:
        if uri is None:
            return True
        if isinstance(uri, dict):
            return all(default_data(u) for u in uri.values())
        return str(uri) in ("", DATA) or str(Path(str(uri)).expanduser()).startswith(str(Path("~/.qlib").expanduser()))

    def init(default_conf="client", **kwargs):
        if MODE == "server":
            from qlib_server.client import client_config

            host, port = SERVER.rsplit(":", 1)
            rest = {k: v for k, v in kwargs.items() if k not in DATA_SOURCE}
            return real_init(**client_config(host, int(port), timeout=600), provider_uri="", **rest)
        if default_data(kwargs.get("provider_uri")):
            kwargs["provider_uri"] = DATA
        return real_init(default_conf, **kwargs)

    qlib.init = init
    qlib.tests.init = init


def pytest_configure(config):
    global RECORDER
    if MODE not in ("local", "server") or not DATA or (MODE == "server" and not SERVER):
        raise pytest.UsageError("qlib_suite plugin: set QLIB_SUITE_MODE (local/server), QLIB_SUITE_DATA and, "
                                "for server, QLIB_SUITE_SERVER=host:port")
    _install_data_source()
    RECORDER = Recorder(OUT)
    _install_recording(RECORDER)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    RECORDER.test = item.nodeid
    yield
    RECORDER.test = "<between tests>"


def pytest_runtest_logreport(report):
    outcome = RECORDER.outcomes.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.failed:
        outcome["outcome"] = "failed" if report.when == "call" else "error"
        text = report.longreprtext.strip().splitlines()
        errors = [line for line in text if line.startswith("E ")]
        named = [line for line in errors if "Error" in line] or errors  # the exception's own line, if any
        outcome["message"] = (named[-1][1:].strip() if named else (text[-1] if text else ""))[:300]
    elif report.skipped and outcome["outcome"] == "passed":
        outcome["outcome"] = "skipped"
        outcome["message"] = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else "")[:300]


def pytest_sessionfinish(session, exitstatus):
    if RECORDER is not None:
        try:
            RECORDER.save()
        except Exception:
            traceback.print_exc()
