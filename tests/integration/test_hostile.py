"""Hostile clients against a real server on RabbitMQ and Redis.

Nothing a client sends runs as code or reaches outside the data directory; every hostile request is
answered with an error within a few seconds; the server, its workers and other clients carry on.
Connection admission (``allowed_networks``, ``auth_token``) and the per-connection in-flight limit
are checked on the wire too.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import struct
import subprocess
import time
from pathlib import Path

import pytest
import requests
import socketio
from clients import WireClient, run_pyqlib
from conftest import wait_until

from qlib_server.config import ServerConfig

pytestmark = pytest.mark.integration

ANSWER_WITHIN = 5.0  # seconds: a hostile request not answered by then counts as a hung client
HEAD = {"version": "0.9.7"}
CODES = ["SH600000", "SZ000001"]
CALENDAR = {"start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "future": False}
INSTRUMENT = {"instruments": {"market": "csi300", "filter_pipe": []}, "as_list": True}
FEATURE = {"instruments": {"market": "csi300", "filter_pipe": []}, "fields": ["$close"], "disk_cache": 1}
MAX_FIELDS = ServerConfig.model_fields["max_fields"].default  # the servers here run on the default limits
BODIES = {"calendar": CALENDAR, "instrument": INSTRUMENT, "feature": FEATURE}


class Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def envelope(body, encoding: str = "json") -> dict:
    if encoding == "json":
        body = json.dumps(body)
    elif encoding == "pickle":
        body = pickle.dumps(body, protocol=4)
    return {"head": HEAD, "body": body}


def with_rule(kind: str, rule: str) -> dict:
    market = {"market": "csi300", "filter_pipe": [{"filter_type": "ExpressionDFilter", "rule_expression": rule}]}
    return {**BODIES[kind], "instruments": market}


def hostile_requests(marker: Path, max_body_bytes: int) -> list[tuple[str, str, object]]:
    """(what, event, payload) for everything a hostile client might send."""
    touch = f"__import__('os').system('touch {marker}')"
    codes = [touch, f"$close + {touch}", f"Mean($close, 5) * {touch}", "(().__class__.__base__.__subclasses__)()",
             f"(lambda: {touch})()", f"Mean($close, 5); {touch}", "ｅval('1')", "$close.__class__"]
    out = []
    for n, code in enumerate(codes):
        for encoding in ("json", "pickle", "dict"):
            out.append((f"code in a field #{n} ({encoding})", "feature",
                        envelope({**FEATURE, "fields": ["$close", code]}, encoding)))
            out.append((f"code in an instrument filter rule #{n} ({encoding})", "instrument",
                        envelope(with_rule("instrument", code), encoding)))
            out.append((f"code in a feature filter rule #{n} ({encoding})", "feature",
                        envelope(with_rule("feature", code), encoding)))
    shell = f"touch {marker}"
    for what, obj in [("os.system", Reduce(os.system, shell)), ("os.popen", Reduce(os.popen, shell)),
                      ("subprocess.call", Reduce(subprocess.call, ["touch", str(marker)])),
                      ("subprocess.Popen", Reduce(subprocess.Popen, ["touch", str(marker)])),
                      ("eval", Reduce(eval, touch)), ("exec", Reduce(exec, f"import os; os.system({shell!r})"))]:
        for kind in BODIES:
            for protocol in (0, 2, 4):
                body = pickle.dumps({**BODIES[kind], "start_time": obj}, protocol=protocol)
                out.append((f"pickle calling {what} in a {kind} body (protocol {protocol})", kind,
                            {"head": HEAD, "body": body}))
    text_pickle = f"cos\nsystem\n(S'{shell}'\ntR.".encode()
    out.append(("text pickle calling os.system", "calendar", {"head": HEAD, "body": text_pickle}))
    for name in ["../../etc", "csi300/../../x", "/etc", "..", "csi300\x00", "csi300\n"]:
        out.append((f"market {name!r}", "instrument", envelope({**INSTRUMENT, "instruments": {"market": name}})))
        out.append((f"instrument code {name!r}", "feature", envelope({**FEATURE, "instruments": [name]})))
    for freq in ["day/../../x", "../day", "day\x00", "day\n"]:
        out.append((f"freq {freq!r}", "calendar", envelope({**CALENDAR, "freq": freq})))
    for expression in ["ChangeInstrument('../x', $close)", "ChangeInstrument('/etc/passwd', $close)",
                       "Mask($close, '../../x')"]:
        out.append((f"path in {expression}", "feature", envelope({**FEATURE, "fields": [expression]})))
    out += [
        ("junk bytes body", "feature", {"head": HEAD, "body": bytes(range(256))}),
        ("non-UTF-8 bytes body", "calendar", {"head": HEAD, "body": b"\xff\xfe\xfd not utf-8 \x80\x81"}),
        ("truncated pickle", "feature", {"head": HEAD, "body": pickle.dumps(FEATURE, protocol=4)[:-7]}),
        ("invalid JSON body", "instrument", {"head": HEAD, "body": '{"instruments": '}),
        ("body over max_body_bytes", "feature", {"head": HEAD, "body": "x" * (max_body_bytes + 100)}),
        ("string payload", "calendar", "calendar please"),
        ("list payload", "instrument", [HEAD, INSTRUMENT]),
        ("bytes payload", "feature", b"\x00\x01\x02junk"),
        ("no head", "calendar", {"body": json.dumps(CALENDAR)}),
        ("old client version", "calendar", {"head": {"version": "0.1.0"}, "body": json.dumps(CALENDAR)}),
        ("instruments as a number", "feature", envelope({**FEATURE, "instruments": 42})),
        ("fields as a mapping", "feature", envelope({**FEATURE, "fields": {"$close": 1}})),
        ("too many fields", "feature",
         envelope({**FEATURE, "fields": [f"Ref($close, {i})" for i in range(MAX_FIELDS + 1)]})),
        ("expression nested too deep", "feature", envelope({**FEATURE, "fields": ["(" * 40 + "$close" + ")" * 40]})),
        ("year 99999", "calendar", envelope({**CALENDAR, "start_time": "99999-01-01"})),
        ("start after end", "feature", envelope({**FEATURE, "start_time": "2020-01-01", "end_time": "2019-01-01"})),
        # found while writing these tests: each of these used to raise inside the listener (no answer at all)
        ("5000-digit int as freq (pickle)", "calendar", envelope({**CALENDAR, "freq": 10 ** 5000}, "pickle")),
        ("5000-digit int as disk_cache (pickle)", "feature", envelope({**FEATURE, "disk_cache": 10 ** 5000}, "pickle")),
        ("list as filter_type", "instrument", envelope({**INSTRUMENT, "instruments": {
            "market": "csi300", "filter_pipe": [{"filter_type": ["NameDFilter"]}]}})),
        ("JSON nested 100,000 deep", "calendar",
         {"head": HEAD, "body": '{"freq": ' + "[" * 100_000 + "]" * 100_000 + "}"}),
        ("memo index 2**24 (256 MiB memo)", "calendar",
         {"head": HEAD, "body": b"\x80\x04Nr" + struct.pack("<I", 1 << 24) + b"0]."}),
    ]
    bomb = ["a" * 100]
    for _ in range(3):
        bomb = [bomb] * 64
    out.append(("pickle whose str() is 27 MB", "calendar", envelope({**CALENDAR, "freq": bomb}, "pickle")))
    return out


UNKNOWN_EVENTS = ["shell_request", "exec", "calendar", "feature_response", "x" * 100, "__init__"]


class Prober:
    """Sends one hostile request at a time and times its answer; a connection whose request went
    unanswered is replaced, so that a late answer is never taken for the next request's."""

    def __init__(self, url: str):
        self.url = url
        self.client = self._connect()
        self.results: list[tuple[str, float | None, dict | None]] = []

    def _connect(self) -> WireClient:
        client = WireClient(self.url)
        for name in UNKNOWN_EVENTS + ["unknown"]:
            response = f"{name[:-8] if name.endswith('_request') else name}_response"
            q = client.responses.setdefault(name, queue.Queue())
            client.sio.on(response, lambda msg, q=q: q.put(msg))
        return client

    def probe(self, what: str, event: str, payload, answer_on: str) -> None:
        started = time.monotonic()
        if payload is None:
            self.client.sio.emit(event)
        else:
            self.client.sio.emit(event, payload)
        try:
            answer = self.client.responses[answer_on].get(timeout=ANSWER_WITHIN)
            self.results.append((what, time.monotonic() - started, answer))
        except queue.Empty:
            self.results.append((what, None, None))
            self.client.close()
            self.client = self._connect()

    def close(self) -> None:
        self.client.close()


def test_hostile_requests_are_refused_quickly_and_nothing_runs(start_server, tmp_path, dataset):
    server = start_server()
    marker = tmp_path / "MARKER"
    prober = Prober(server.url)
    try:
        for what, kind, payload in hostile_requests(marker, server.config.get("max_body_bytes", 1 << 20)):
            prober.probe(what, f"{kind}_request", payload, kind)
        prober.probe("event without a payload", "calendar_request", None, "calendar")
        for name in UNKNOWN_EVENTS:
            answer_on = "unknown" if len(name) >= 40 else name
            prober.probe(f"unknown event {name[:20]!r}", name, envelope(CALENDAR), answer_on)
        results = prober.results
        unanswered = [what for what, seconds, _ in results if seconds is None]
        accepted = [(what, answer) for what, seconds, answer in results if answer and answer["status"] == 0]
        unclear = [(what, answer) for what, _, answer in results
                   if answer and not (isinstance(answer["detailed_info"], str) and answer["detailed_info"].strip())]
        slowest = max((seconds, what) for what, seconds, _ in results if seconds is not None)
        print(f"\n{len(results)} hostile requests, {len(results) - len(unanswered)} answered; "
              f"slowest answer {slowest[0] * 1000:.0f} ms ({slowest[1]})")
        assert unanswered == [], f"no answer within {ANSWER_WITHIN}s: {unanswered}"
        assert accepted == [] and unclear == []

        # the server still serves good requests, on the same connection and on a new one
        good = prober.client.request("calendar", CALENDAR, timeout=60)
        assert good["status"] == 0 and good["result"], good
        with WireClient(server.url) as fresh:
            body = {**FEATURE, "instruments": CODES, "fields": ["$close", "Mean($close, 5)"]}
            features = fresh.request("feature", body, "pickle", timeout=120)
            assert features["status"] == 0 and features["result"], features
    finally:
        prober.close()
    assert not marker.exists(), "a hostile request ran code on the server"
    assert server.proc.poll() is None
    log = server.log()
    assert "is gone" not in log and "exceeded the" not in log, "a worker died or hung:\n" + log[-3000:]
    assert server.metric("qlib_server_tasks_processed_total", type="feature", status="0") >= 1


def test_an_oversized_request_below_the_transport_limit_is_answered_naming_the_limit(server):
    """200,000 fields: a 2.4 MB JSON body, the same pickled, and the same as a plain mapping."""
    fields = [f"$close+{i}" for i in range(200_000)]
    body = {**FEATURE, "fields": fields}
    with WireClient(server.url) as client:
        for encoding in ("json", "pickle", "raw"):
            sent = time.monotonic()
            client.send("feature", body, encoding=encoding)
            answer = client.receive("feature", 30)
            size = len(json.dumps(fields)) if encoding != "pickle" else len(pickle.dumps(body))
            print(f"\n{encoding} body of {size / 1e6:.1f} MB: status {answer['status']} in "
                  f"{time.monotonic() - sent:.2f}s: {answer['detailed_info']}")
            assert answer["status"] == 1 and answer["result"] is None
            limit = "max_body_bytes" if encoding != "raw" else f"1 to {MAX_FIELDS} expressions"
            assert limit in answer["detailed_info"]
        assert client.request("calendar", CALENDAR, timeout=30)["status"] == 0, "the connection still serves"


def test_a_body_beyond_the_transport_limit_closes_only_that_connection(server):
    with WireClient(server.url) as other:
        big = WireClient(server.url)
        big.send("calendar", "x" * (17 << 20), encoding="raw")
        wait_until(lambda: not big.sio.connected, 30, what="the oversized connection to close")
        answer = other.request("calendar", CALENDAR, timeout=60)
        assert answer["status"] == 0 and answer["result"]
    assert server.proc.poll() is None


# --- connection admission -----------------------------------------------------------------------------


def test_a_client_outside_allowed_networks_cannot_connect(start_server):
    server = start_server(allowed_networks=["10.0.0.0/8"])
    with pytest.raises(socketio.exceptions.ConnectionError):
        WireClient(server.url)
    with pytest.raises(socketio.exceptions.ConnectionError):
        WireClient(server.url, auth={"token": "anything"})
    assert requests.get(f"{server.url}/metrics", timeout=5).status_code == 403  # metrics are guarded alike
    assert server.log().count("refused connection from 127.0.0.1") == 3


def test_a_client_needs_the_token_when_one_is_configured(start_server):
    server = start_server(auth_token="s3cret")
    for auth in (None, {"token": "wrong"}, {"token": "s3cre"}, {"token": 0}, {"tok": "s3cret"}, {"token": ["s3cret"]}):
        with pytest.raises(socketio.exceptions.ConnectionError):
            WireClient(server.url, auth=auth)
    assert server.metric("qlib_server_refused_connections_total") == 6
    with WireClient(server.url, auth={"token": "s3cret"}) as client:
        answer = client.request("calendar", CALENDAR, timeout=60)
        assert answer["status"] == 0 and answer["result"]


def test_an_unmodified_pyqlib_client_works_inside_allowed_networks(start_server, dataset):
    server = start_server(allowed_networks=["127.0.0.0/8"])
    codes = run_pyqlib('result = D.list_instruments(D.instruments("csi300"), as_list=True)', server.port, dataset)
    assert len(codes) > 0
    assert server.metric("qlib_server_requests_total", type="instrument") >= 1
    assert server.metric("qlib_server_refused_connections_total") == 0


# --- flood ---------------------------------------------------------------------------------------------


def test_a_flooding_connection_gets_refusals_and_others_are_still_served(start_server):
    limit, sent = 4, 20
    server = start_server(max_inflight_per_client=limit)
    with WireClient(server.url) as flood, WireClient(server.url) as calm:
        for i in range(sent):  # distinct cold feature sets: none is cached, none joins another
            flood.send("feature", {**FEATURE, "fields": [f"Ref($close, {i + 1})", f"Mean($volume, {i + 2})"]})
        started = time.monotonic()
        calendar = calm.request("calendar", {**CALENDAR, "end_time": "2019-06-30"}, timeout=60)
        calendar_seconds = time.monotonic() - started
        answers = [flood.receive("feature", timeout=180) for _ in range(sent)]
    refused = [a for a in answers if a["status"] == 1 and "in flight" in (a["detailed_info"] or "")]
    computed = [a for a in answers if a["status"] == 0]
    print(f"\nflood of {sent} cold feature requests (limit {limit}): {len(refused)} refused, {len(computed)} "
          f"computed; another client's calendar answered in {calendar_seconds * 1000:.0f} ms meanwhile")
    assert calendar["status"] == 0 and calendar["result"]
    assert len(refused) + len(computed) == sent, answers
    assert len(refused) >= sent - 2 * limit, f"only {len(refused)} of {sent} refused with a limit of {limit}"
    assert server.proc.poll() is None
