"""Hypothesis fuzzing of the whole request path in this process.

Each example goes through ``RequestListener.on_request`` with the real parser, a fakeredis registry and
result cache, a MemoryBroker and the real responder. Whatever the payload, the call never raises and ends
in exactly one of: a refusal (status != 0, a non-empty reason), an answer from the result cache, or the
session waiting on a task that was published; a queued session is answered exactly once when the result
comes back, and a good request afterwards is still queued and answered.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import pickle
import re
import resource
import tempfile
import time
from collections import Counter, OrderedDict
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

from qlib_server.errors import RequestError
from qlib_server.expressions import qlib_operators
from qlib_server.protocol import REQUEST_TYPES

pytestmark = pytest.mark.timeout(1800)  # the long profile runs 4,000 examples per property
HEAD = {"version": "0.9.7"}
OPERATORS = sorted(qlib_operators())
MARKER = Path(tempfile.gettempdir()) / f"qlib-fuzz-marker-{os.getpid()}"
TRIPPED: list = []
STATS = {"outcomes": Counter(), "slowest": 0.0, "calls": 0}


def _tripwire(*args):
    """Called only if a pickle managed to run code while it was loaded."""
    TRIPPED.append(args)


class Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """Cap the address space while fuzzing: random bytes that happen to be a memo-index bomb then fail
    with MemoryError instead of filling the machine (the bomb itself is a test in test_security.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    limit = in_use + (3 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Print what the fuzzing did; check that no pickle ran code."""
    yield
    print(f"\nrequest path fuzz: {STATS['calls']} calls, outcomes {dict(STATS['outcomes'])}, "
          f"slowest call {STATS['slowest'] * 1000:.1f} ms")
    assert not TRIPPED and not MARKER.exists(), "a pickle ran code while it was loaded"


@pytest.fixture
def path(request_path_factory):
    """One request path per property (hypothesis runs all of a property's examples on it)."""
    return request_path_factory(max_inflight_per_client=3)


# --- the invariant ---------------------------------------------------------------------------------


def fake_result(task: dict):
    return [task["type"], task["key"][:8]]


def call(path, request_type, payload, sid: str | None = None) -> str:
    """Send one request event and check its outcome; return 'refused', 'cached' or 'queued'."""
    sid = sid or path.new_sid()
    started = time.perf_counter()
    path.listener.on_request(request_type, sid, payload)  # must never raise
    elapsed = time.perf_counter() - started
    STATS["calls"] += 1
    STATS["slowest"] = max(STATS["slowest"], elapsed)
    answers = path.responses.pop(sid, [])
    tasks = path.take_tasks()
    try:
        return _outcome(path, request_type, payload, sid, answers, tasks)
    except BaseException:  # leave no waiter behind to disturb the next example
        for task in tasks:
            path.finish(task, 2, None, "abandoned")
        raise


def _outcome(path, request_type, payload, sid: str, answers: list, tasks: list) -> str:
    if answers:  # answered at once, before on_request returned: refused or from the cache
        assert len(answers) == 1 and tasks == [] and path.pending.count(sid) == 0, (answers, tasks)
        name, answer = answers[0]
        assert name == f"{request_type}_response" and set(answer) == {"result", "status", "detailed_info"}
        if answer["status"] == 0:
            request = path.parser.parse(request_type, payload)
            assert answer["result"] == path.cache.get(request.key) and answer["detailed_info"] is None
            return "cached"
        assert isinstance(answer["status"], int) and answer["result"] is None
        assert isinstance(answer["detailed_info"], str) and answer["detailed_info"].strip()
        note(f"refused: {answer['detailed_info'][:200]}")
        return "refused"
    assert len(tasks) == 1 and path.pending.count(sid) == 1, (tasks, path.pending.count(sid))
    [task] = tasks
    assert task["type"] == request_type and path.registry.waiting(task["key"]) == [path.waiter(sid)]
    failed = int(task["key"][:2], 16) % 4 == 0  # some tasks fail, the others succeed
    result = None if failed else fake_result(task)
    path.finish(task, 2 if failed else 0, result, "computation failed" if failed else None)
    expected = {"result": result, "status": 2 if failed else 0,
                "detailed_info": "computation failed" if failed else None}
    assert path.responses.pop(sid, []) == [(f"{request_type}_response", expected)]
    assert path.pending.count(sid) == 0 and path.registry.waiting(task["key"]) == []
    return "queued"


GOOD_CODES = iter(range(10 ** 9))


def check(path, request_type, payload) -> str:
    """The invariant for one hostile event, then a good request that must still be queued and answered."""
    outcome = call(path, request_type, payload)
    event(f"outcome: {outcome}")
    STATS["outcomes"][outcome] += 1
    good = {"instruments": [f"GOOD{next(GOOD_CODES)}"], "fields": ["$close"], "freq": "day", "disk_cache": 1}
    assert call(path, "feature", {"head": HEAD, "body": good}) == "queued"
    return outcome


# --- strategies ---------------------------------------------------------------------------------------

KEYS = ["head", "body", "version", "start_time", "end_time", "freq", "future", "instruments", "market", "filter_pipe",
        "fields", "disk_cache", "as_list", "filter_type", "name_rule_re", "rule_expression", "keep",
        "filter_start_time", "filter_end_time", "NameDFilter", "ExpressionDFilter"]
HOSTILE_STRINGS = ["../../etc", "csi300/../../x", "/etc/passwd", "..", ".", "a\x00b", "csi300\n", "day/../../x",
                   "__import__('os').system('true')", "$close", "Mean($close, 5)", "csi300", "SH600000", "day",
                   "2019-01-01", "99999-01-01", "1000-01-01", "", " ", "\ud800", "x" * 300,
                   "ChangeInstrument('../x', $close)"]
# built by map: hypothesis reprs sampled_from elements, and str() of a 5000-digit int raises ValueError
HUGE_INTS = st.sampled_from([5000, -5000, 63, 64]).map(
    lambda n: 10 ** n if n > 100 else -(10 ** -n) if n < 0 else 2 ** n)
keyish = st.sampled_from(KEYS) | st.text(max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | st.sampled_from(HOSTILE_STRINGS))
json_like = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                         | st.dictionaries(keyish, inner, max_size=5), max_leaves=25)
py_scalars = (json_scalars | st.binary(max_size=20) | HUGE_INTS | st.datetimes() | st.dates()
              | st.times() | st.timedeltas() | st.sampled_from([float("nan"), float("inf"), pd.Timestamp("2019-01-01"),
                                                                pd.Timestamp("2262-04-11"), pd.NaT]))
hashables = st.recursive(py_scalars,
                         lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6)
py_like = st.recursive(py_scalars, lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
                       | st.dictionaries(keyish | hashables, inner, max_size=5) | st.sets(hashables, max_size=3),
                       max_leaves=25)

MARKETS = st.sampled_from(["csi300", "csi100", "all", "CSI300"])
CODES = (st.sampled_from(["SH600000", "SZ000001", "SH600519", "sz000002"])
         | st.from_regex(r"[A-Z]{2}[0-9]{6}", fullmatch=True))
DATES = (st.none() | st.dates(dt.date(1990, 1, 1), dt.date(2100, 1, 1)).map(str)
         | st.datetimes(dt.datetime(1990, 1, 1), dt.datetime(2100, 1, 1))
         | st.sampled_from(["None", "", pd.Timestamp("2019-06-30")]))
FREQS = st.sampled_from(["day", "1min", "Day", "week", "5min"])
VALID_EXPRESSIONS = st.sampled_from(["$close", "Mean($close, 5)", "Ref($open, 1) / $close", "Std($volume, 20)",
                                     "($high - $low) / $open", "Rolling($close, 5, 'mean')",
                                     "If($close > $open, 1, 0)"])
FILTERS = st.lists(st.one_of(
    st.builds(lambda r: {"filter_type": "NameDFilter", "name_rule_re": r}, st.sampled_from(["SH", "^SZ", "6.*"])),
    st.builds(lambda e, k: {"filter_type": "ExpressionDFilter", "rule_expression": e, "keep": k},
              st.sampled_from(["$close > 10", "Mean($close, 5) < 100"]), st.booleans())), max_size=2)
MARKET_CONFIGS = st.builds(lambda m, f: {"market": m, "filter_pipe": f}, MARKETS, FILTERS)
VALID_BODIES = {
    "calendar": st.fixed_dictionaries({"start_time": DATES, "end_time": DATES, "freq": FREQS, "future": st.booleans()}),
    "instrument": st.fixed_dictionaries({"instruments": MARKET_CONFIGS, "start_time": DATES, "end_time": DATES,
                                         "freq": FREQS, "as_list": st.booleans()}),
    "feature": st.fixed_dictionaries({
        "instruments": MARKET_CONFIGS | st.lists(CODES, min_size=1, max_size=5),
        "fields": st.lists(VALID_EXPRESSIONS, min_size=1, max_size=4),
        "start_time": DATES, "end_time": DATES, "freq": FREQS, "disk_cache": st.sampled_from([0, 1])}),
}
ENCODINGS = st.sampled_from(["dict", "json", "pickle0", "pickle2", "pickle4", "pickle5"])
VERSIONS = st.sampled_from(["0.9.7"] * 6 + ["0.9.7.dev", "0.3.0", "99", "", None, 97, "x" * 100]) | st.text(max_size=10)


def encode(body, how: str):
    """The body as the wire carries it: a mapping, JSON text, or a pickle of some protocol."""
    if how == "dict":
        return body
    if how == "json":
        try:
            return json.dumps(body)
        except (TypeError, ValueError, RecursionError):
            how = "pickle4"
    try:
        return pickle.dumps(body, protocol=int(how[-1]))
    except ValueError:  # protocols 0 and 1 write ints as decimal text, which Python refuses over 4300 digits
        return pickle.dumps(body, protocol=4)


def envelope(body, how: str, version="0.9.7") -> dict:
    return {"head": {"version": version}, "body": encode(body, how)}


@st.composite
def mutated_requests(draw):
    """A valid request with up to four mutations: a slot set to junk, dropped, added, or nested junk."""
    kind = draw(st.sampled_from(REQUEST_TYPES))
    body = draw(VALID_BODIES[kind])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "drop", "add", "market", "filter", "code"]))
        if op == "set" and body:
            body[draw(st.sampled_from(list(body)))] = draw(py_like | st.sampled_from(HOSTILE_STRINGS))
        elif op == "drop" and body:
            body.pop(draw(st.sampled_from(list(body))))
        elif op == "add":
            body[draw(keyish | hashables)] = draw(py_like)
        elif op in ("market", "filter") and isinstance(body.get("instruments"), dict):
            if op == "market":
                body["instruments"]["market"] = draw(py_like | st.sampled_from(HOSTILE_STRINGS))
            else:
                body["instruments"].setdefault("filter_pipe", []).append(draw(py_like | st.fixed_dictionaries(
                    {"filter_type": st.sampled_from(["NameDFilter", "ExpressionDFilter"]) | py_like},
                    optional={k: py_like | st.sampled_from(HOSTILE_STRINGS) for k in
                              ("name_rule_re", "rule_expression", "keep", "filter_start_time", "evil")})))
        elif op == "code" and isinstance(body.get("instruments"), list):
            body["instruments"].append(draw(py_like | st.sampled_from(HOSTILE_STRINGS)))
    return kind, body


# Expressions: Qlib's grammar with hostile names and suffixes mixed in, then junk inserted.
ATOMS = (st.sampled_from(["$close", "$open", "$high", "$low", "$volume", "$$roewa_q", "$factor"])
         | st.integers(-1000, 10 ** 6).map(str) | st.floats(allow_nan=False, allow_infinity=False).map(repr)
         | st.sampled_from(["'SH600000'", "'../x'", "'/etc/passwd'", "'day'", "'mean'", '"os"', "'1min'", "'last'"]))
NAMES = st.sampled_from(OPERATORS) | st.sampled_from(["__import__", "eval", "exec", "open", "getattr", "globals",
                                                      "lambda", "os", "system", "Operators", "Feature", "PFeature",
                                                      "print", "if"])
expressions = st.recursive(ATOMS, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "/", ">", "<", ">=", "<=", "==", "!=", "&", "|", "**", "//", "%",
                                      " and ", " or ", " if ", "."]), inner).map("".join),
    inner.map(lambda e: f"({e})"),
    st.tuples(NAMES, st.lists(inner, max_size=4)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
    st.tuples(inner, st.sampled_from([".__class__", "[0]", ".__globals__", "()", "; 1", "\n1", " #", ":=1"])
              ).map("".join),
), max_leaves=12)


@st.composite
def expressions_with_junk(draw):
    text = draw(expressions)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        junk = draw(st.text(min_size=1, max_size=4) | st.sampled_from(["\x00", "\n", "'", "$", "..", "/"]))
        text = text[:at] + junk + text[at:]
    return text


_PIECES = re.compile(r"""(?P<string>'[^'\n]*'|"[^"\n]*")|(?P<feature>\$\$?[A-Za-z_]\w*)
    |(?P<number>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)|(?P<name>[A-Za-z_]\w*)|(?P<other>.)""",
                     re.VERBOSE | re.DOTALL)


def only_qlib_language(text: str) -> bool:
    """What an accepted expression may hold: operator names, features, numbers, strings, operators."""
    for piece in _PIECES.finditer(text):
        if piece.lastgroup == "name" and piece.group() not in OPERATORS:
            return False
        if piece.lastgroup == "other" and piece.group() not in " \t+-*/<>=!&|(),":
            return False
    return True


class NotARequest:
    """An ordinary class no request may contain."""


DISALLOWED = st.sampled_from([
    Reduce(_tripwire, "ran"), Reduce(os.system, f"touch {MARKER}"), Reduce(eval, f"open({str(MARKER)!r}, 'w')"),
    Reduce(functools.partial(_tripwire, 1)), OrderedDict(a=1), Decimal("1.5"), complex(1, 2), range(3), slice(1, 2),
    bytearray(b"x"), np.float64(1.5), np.arange(3), pd.Series([1.0]), pd.DataFrame({"a": [1]}), Path("/etc/passwd"),
    re.compile("x"), dt.timezone.utc, dt.datetime(2019, 1, 1, tzinfo=dt.timezone.utc),
    pd.Timestamp("2019-01-01", tz="UTC"),
    pd.Timedelta(1), NotARequest(), type(None), Ellipsis, NotImplemented,
])


@st.composite
def pickles(draw):
    """Pickles of allowed and disallowed objects, in request slots or as the whole body, any protocol."""
    kind, body = draw(mutated_requests())
    value = draw(DISALLOWED | py_like)
    where = draw(st.sampled_from(["slot", "body", "nested"]))
    if where == "slot":
        body[draw(st.sampled_from(list(body) or ["freq"]))] = value
    elif where == "nested":
        body["instruments"] = {"market": "csi300",
                               "filter_pipe": [{"filter_type": "NameDFilter", "name_rule_re": value}]}
    else:
        body = value
    data = encode(body, f"pickle{draw(st.integers(0, 5))}")
    if draw(st.booleans()):  # sometimes damaged: cut, or a byte flipped
        at = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data = data[:at]
        else:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return kind, data


# --- the properties ----------------------------------------------------------------------------------


@given(kind=st.sampled_from(REQUEST_TYPES), payload=json_like | py_like,
       wrap=st.sampled_from(["bare", "envelope", "json-envelope"]), version=VERSIONS)
def test_fuzz_random_json_like_payloads_are_answered(path, kind, payload, wrap, version):
    if wrap == "envelope":
        payload = {"head": {"version": version}, "body": payload}
    elif wrap == "json-envelope":
        payload = envelope(payload, "json", version)
    check(path, kind, payload)


@given(request=mutated_requests(), how=ENCODINGS, version=VERSIONS)
def test_fuzz_mutated_valid_requests_are_answered_or_queued(path, request, how, version):
    kind, body = request
    check(path, kind, envelope(body, how, version))


@given(texts=st.lists(expressions_with_junk(), min_size=1, max_size=3), how=ENCODINGS,
       place=st.sampled_from(["fields of codes", "fields of a market", "instrument rule", "feature rule", "both"]))
def test_fuzz_expressions_from_the_grammar_and_junk(path, texts, place, how):
    rule = {"filter_type": "ExpressionDFilter", "rule_expression": texts[0], "keep": False}
    market = {"market": "csi300", "filter_pipe": [rule] if place in ("instrument rule", "feature rule", "both") else []}
    kind, body, used = {
        "fields of codes": ("feature", {"instruments": ["SH600000"], "fields": texts}, texts),
        "fields of a market": ("feature", {"instruments": market, "fields": texts}, texts),
        "instrument rule": ("instrument", {"instruments": market}, texts[:1]),
        "feature rule": ("feature", {"instruments": market, "fields": ["$close"]}, texts[:1]),
        "both": ("feature", {"instruments": market, "fields": texts}, texts),
    }[place]
    if check(path, kind, envelope(body, how)) != "refused":  # accepted text is Qlib's expression language only
        assert all(only_qlib_language(t) for t in used), used


@given(kind=st.sampled_from(REQUEST_TYPES), body=st.one_of(
    st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"\x80\x04" + b), st.text(max_size=200),
    st.text(max_size=50).map(lambda t: '{"freq": "' + t), st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    VALID_BODIES["feature"].map(lambda b: pickle.dumps(b, protocol=4)[:-1]),
))
def test_fuzz_random_bytes_and_text_bodies_are_refused_or_queued(path, kind, body):
    check(path, kind, {"head": HEAD, "body": body})


@given(request=pickles())
def test_fuzz_pickles_of_allowed_and_disallowed_objects_never_run_code(path, request):
    kind, data = request
    check(path, kind, {"head": HEAD, "body": data})
    assert not TRIPPED and not MARKER.exists()


@given(name=st.sampled_from(REQUEST_TYPES) | st.text(max_size=40) | st.sampled_from(
    ["", "Calendar", "calendar ", "feature_request", "__init__", "parse", "_calendar", "_decode", "_market",
     "unknown"]),
    request=mutated_requests(), how=ENCODINGS)
def test_fuzz_random_event_types_are_refused_or_served(path, name, request, how):
    outcome = check(path, name, envelope(request[1], how))
    assert outcome == "refused" or name in REQUEST_TYPES


@given(steps=st.lists(st.tuples(mutated_requests(), ENCODINGS, st.booleans()), min_size=1, max_size=8))
def test_fuzz_one_connection_with_many_requests_is_answered_once_per_request(path, steps):
    """A connection sending a stream of requests, results coming back at random points: every request
    gets exactly one answer, and a good one arriving with ``max_inflight_per_client`` keys pending is refused."""
    sid, held = path.new_sid("conn"), []
    try:
        send_all(path, sid, steps, held)
    finally:  # answer whatever is still held, also when an assertion failed midway
        for task in held:
            path.finish(task, 0, fake_result(task))
    answers = path.responses.pop(sid, [])
    assert len(answers) == len(steps) and path.pending.count(sid) == 0, (len(answers), len(steps))


def send_all(path, sid: str, steps: list, held: list) -> None:
    """Send each step on one connection, checking its immediate outcome; deliver results when told."""
    for (kind, body), how, deliver in steps:
        payload = envelope(body, how)
        before, pending_before = len(path.responses.get(sid, [])), path.pending.count(sid)
        path.listener.on_request(kind, sid, payload)
        new = [answer for _, answer in path.responses.get(sid, [])[before:]]
        held += path.take_tasks()
        assert len(new) <= 1 and path.pending.count(sid) <= path.cfg.max_inflight_per_client
        assert not new or new[0]["status"] == 0 or new[0]["detailed_info"].strip()
        try:
            path.parser.parse(kind, payload)
            good = True
        except RequestError:
            good = False
        if good:
            over = bool(new) and "too many requests in flight" in (new[0]["detailed_info"] or "")
            assert over == (pending_before >= path.cfg.max_inflight_per_client), (pending_before, new)
            event("good request over the in-flight limit: refused" if over else "good request within the limit")
        else:
            assert new and new[0]["status"] == 1
        if deliver:
            while held:
                task = held.pop()
                path.finish(task, 0, fake_result(task))
