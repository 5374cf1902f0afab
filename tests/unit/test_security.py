"""Hostile input, threat by threat, through the real request parser and the in-process request path.

No code execution (fields, filter rules, pickles), no path escape (markets, codes, freqs, expression
strings), no resource exhaustion (limits, pickle and repr bombs), and a clear, short refusal for
malformed input, always before anything reaches Qlib.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import pickle
import struct
import subprocess
import threading
import time
import tracemalloc

import pytest
from pandas._libs.tslibs.timestamps import _unpickle_timestamp

from qlib_server.config import make_config
from qlib_server.errors import RequestError
from qlib_server.front.handler import make_parser
from qlib_server.state.cache import ResultCache

PARSER = make_parser(make_config(provider_uri="/nonexistent/qlib-data"))
HEAD = {"version": "0.9.7"}
CALENDAR = {"start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "future": False}
INSTRUMENT = {"instruments": {"market": "csi300", "filter_pipe": []}, "start_time": "2019-01-01",
              "end_time": "2019-12-31", "freq": "day", "as_list": True}
FEATURE = {"instruments": {"market": "csi300", "filter_pipe": []}, "fields": ["$close", "Mean($close, 5)"],
           "start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "disk_cache": 1}
BODIES = {"calendar": CALENDAR, "instrument": INSTRUMENT, "feature": FEATURE}
MAX_MESSAGE = 1000  # a refusal echoes at most a short prefix of what it refuses
BOMB_MEMORY = 16 << 20  # bytes a refused bomb may allocate while it is parsed


def encode(body, encoding: str):
    if encoding == "pickle":
        return pickle.dumps(body, protocol=4)  # what pyqlib 0.9.7 sends
    if encoding == "json":
        return json.dumps(body)
    return body


def refusal(kind: str, body, parser=PARSER) -> str:
    """Parse a request that must be refused with status 1; return the (short) message the client reads."""
    with pytest.raises(RequestError) as info:
        parser.parse(kind, {"head": HEAD, "body": body})
    message = str(info.value)
    assert info.value.status == 1 and message and len(message) <= MAX_MESSAGE, message[:2000]
    return message


def measured_refusal(kind: str, body) -> tuple[str, float, int]:
    """A refusal with the seconds it took and the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refusal(kind, body)
        return message, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def with_filter(kind: str, rule: str) -> dict:
    market = {"market": "csi300", "filter_pipe": [{"filter_type": "ExpressionDFilter", "rule_expression": rule}]}
    return {**BODIES[kind], "instruments": market}


# --- code execution through expressions --------------------------------------------------------------


def code_expressions(marker) -> list[str]:
    """Expressions that would run Python (and create ``marker``) if they ever reached Qlib's eval."""
    touch = f"__import__('os').system('touch {marker}')"
    return [
        touch,
        f"$close + {touch}",
        f"Mean($close, 5) * {touch}",
        f"Ref($close, {touch})",
        f"(lambda: {touch})()",
        f"[{touch} for x in (1,)]",
        f"eval(\"{touch}\")",
        f"exec(\"{touch}\")",
        f"Mean($close, 5) if {touch} else $open",
        f"Mean($close, 5); {touch}",
        f"Mean($close, 5)\n{touch}",
        "(().__class__.__base__.__subclasses__)()",
        "$close.__class__.__init__.__globals__",
        "Mean.__globals__['os'].system('true')",
        "Ref($close, 1)[0]",
        "getattr($close, '__class__')",
        "Operators.__dict__",
        "open('/etc/passwd').read()",
        "breakpoint()",
        "globals()",
        "Mean($close, x := 5)",
        "Mean($close, 5) # comment",
        "ｅval('1')",  # fullwidth letters are "eval" to Python's parser (NFKC)
        "Ref($close, ０)",
        "$close\x00",
        "\\x5f_import__('os')",
        "Feature('close') .__class__",
        "Rolling($close, 5, '__class__')",
        "Mean($close, 5) ** 2",
        "~$close",
        f"Mean($close, 5) + {touch}" + " " * 10,
    ]


@pytest.mark.parametrize("expression", code_expressions("/tmp/qlib-security-marker"))
@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
@pytest.mark.parametrize("instruments", [{"market": "csi300", "filter_pipe": []}, ["SH600000"]])
def test_code_in_a_field_is_refused_as_an_expression(expression, encoding, instruments):
    body = {**FEATURE, "instruments": instruments, "fields": ["$close", expression]}
    assert "expression refused" in refusal("feature", encode(body, encoding))


@pytest.mark.parametrize("expression", code_expressions("/tmp/qlib-security-marker"))
@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
@pytest.mark.parametrize("kind", ["instrument", "feature"])
def test_code_in_an_expression_filter_rule_is_refused(expression, encoding, kind):
    assert "expression refused" in refusal(kind, encode(with_filter(kind, expression), encoding))


def test_refused_code_never_runs_and_never_becomes_a_task(request_path, tmp_path):
    marker = tmp_path / "MARKER"
    sent = 0
    for expression in code_expressions(marker):
        for kind, body in [("feature", {**FEATURE, "fields": [expression]}),
                           ("instrument", with_filter("instrument", expression)),
                           ("feature", with_filter("feature", expression))]:
            for encoding in ("pickle", "json", "dict"):
                sid = request_path.new_sid()
                request_path.listener.on_request(kind, sid, {"head": HEAD, "body": encode(body, encoding)})
                answers = request_path.responses[sid]
                assert [(e, a["status"]) for e, a in answers] == [(f"{kind}_response", 1)], (expression, answers)
                sent += 1
    assert request_path.take_tasks() == []
    assert not marker.exists()
    print(f"{sent} requests carrying code refused; nothing ran, nothing queued")


# --- code execution through pickles ----------------------------------------------------------------


class Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def dangerous_pickles(marker) -> list[tuple[str, bytes, str]]:
    """(name, pickle, the global its refusal must name): each would create ``marker`` when loaded."""
    touch = f"touch {marker}"
    calls = [
        ("os.system", Reduce(os.system, touch), "system"),
        ("os.popen", Reduce(os.popen, touch), "popen"),
        ("subprocess.call", Reduce(subprocess.call, ["touch", str(marker)]), "call"),
        ("subprocess.Popen", Reduce(subprocess.Popen, ["touch", str(marker)]), "Popen"),
        ("subprocess.check_output", Reduce(subprocess.check_output, ["touch", str(marker)]), "check_output"),
        ("builtins.eval", Reduce(eval, f"__import__('os').system({touch!r})"), "eval"),
        ("builtins.exec", Reduce(exec, f"import os; os.system({touch!r})"), "exec"),
        ("builtins.getattr", Reduce(getattr, Reduce(__import__, "os"), "system"), "getattr"),
        ("builtins.__import__", Reduce(__import__, "os"), "__import__"),
        ("importlib.import_module", Reduce(importlib.import_module, "os"), "import_module"),
    ]
    out = []
    for name, obj, named in calls:
        for protocol in (0, 2, 4, 5):
            out.append((f"{name}/p{protocol}", pickle.dumps({**CALENDAR, "start_time": obj}, protocol=protocol), named))
    m = str(marker).encode()
    out += [
        ("GLOBAL+REDUCE text", b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR.", "system"),
        ("py2 __builtin__.eval", b"c__builtin__\neval\n(S'" + touch.encode() + b"'\ntR.", "eval"),
        ("INST", b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "system"),
        ("OBJ", b"(cos\nsystem\nS'" + touch.encode() + b"'\no.", "system"),
        ("STACK_GLOBAL", b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(m) + 6]) + b"touch " + m + b"\x85R.",
         "system"),
        ("getattr chain", b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93\x8c\x08builtins\x8c\x04list\x93\x8c\x08__dict__"
         b"\x86R.", "getattr"),
    ]
    return out


@pytest.mark.parametrize("name, payload, named", dangerous_pickles("/tmp/qlib-security-marker"),
                         ids=[p[0] for p in dangerous_pickles("/tmp/qlib-security-marker")])
def test_pickles_that_would_run_code_are_refused_naming_the_global(name, payload, named):
    message = refusal("calendar", payload)
    assert "may not contain" in message and named in message


@pytest.mark.parametrize("module, name", [
    ("builtins", "list.__class__"),  # dotted names walk attributes in the default find_class
    ("builtins", "dict.fromkeys"),
    ("datetime", "datetime.strptime"),
    ("builtins ", "set"),
    ("__builtin__", "set"),  # python 2 name, mapped to builtins by the default find_class
    ("copyreg", "_reconstructor"),
    ("builtins", "type"),
    ("builtins", "object"),
    ("pandas._libs.tslibs.timestamps", "Timestamp"),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp.__globals__"),
    ("datetime", "sys"),
    ("posix", "system"),
])
def test_allowed_looking_names_are_refused(module, name):
    m, n = module.encode(), name.encode()
    payload = b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93)R."
    assert "may not contain" in refusal("calendar", payload)


def test_reduce_on_allowed_names_cannot_smuggle_a_call(tmp_path):
    marker = tmp_path / "MARKER"
    smuggled = Reduce(os.system, f"touch {marker}")
    for body in [
        {**CALENDAR, "start_time": Reduce(dt.datetime, 2019, 1, 1, 0, 0, 0, 0, smuggled)},  # as the tzinfo
        {**CALENDAR, "freq": Reduce(list, (smuggled,))},
        {**CALENDAR, "freq": Reduce(frozenset, (smuggled,))},
        {**CALENDAR, "freq": Reduce(dict, [("k", smuggled)])},
    ]:
        assert "system" in refusal("calendar", pickle.dumps(body, protocol=4))
    # BUILD on an allowed class, an allowed callable fed a timezone that names a file
    build = b"\x80\x04\x8c\x08builtins\x8c\x04dict\x93)R}\x8c\x09__class__N\x73b."
    for payload in [build, pickle.dumps(Reduce(_unpickle_timestamp, 0, None, "dateutil//etc/passwd", 10)),
                    pickle.dumps({**CALENDAR, "start_time": Reduce(_unpickle_timestamp, 0, None, "../../etc/x", 10)})]:
        refusal("calendar", payload)
    assert not marker.exists()


def test_refused_pickles_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    for _, payload, _ in dangerous_pickles(marker):
        refusal("calendar", payload)
        refusal("feature", payload)
    assert not marker.exists()


# --- pickle and repr bombs ---------------------------------------------------------------------------


def nested_lists(depth: int) -> bytes:
    """Pickle opcodes of ``depth`` nested empty lists (pickle.dumps itself cannot make them)."""
    return b"]" * depth + b"a" * (depth - 1)


def in_dict(key: str, value_ops: bytes) -> bytes:
    k = key.encode()
    return b"\x80\x02}X" + struct.pack("<I", len(k)) + k + value_ops + b"s."


@pytest.mark.parametrize("kind, key", [("calendar", "freq"), ("calendar", "future"), ("calendar", "start_time"),
                                       ("instrument", "instruments"), ("instrument", "as_list"),
                                       ("feature", "fields"), ("feature", "instruments"), ("feature", "disk_cache")])
def test_deeply_nested_pickles_are_refused(kind, key):
    message, seconds, peak = measured_refusal(kind, in_dict(key, nested_lists(100_000)))
    print(f"{kind}.{key}: 100,000 nested lists refused in {seconds * 1000:.0f} ms, peak {peak >> 20} MiB: "
          f"{message[:80]}")


def reference_bomb(levels: int = 3, width: int = 64, kind=list):
    """A value whose pickle is tiny (memo references) but whose str() is over width**levels * 100 characters."""
    value = kind(["a" * 100])
    for _ in range(levels):
        value = kind([value] * width)
    return value


@pytest.mark.parametrize("kind, body", [
    ("calendar", {**CALENDAR, "freq": reference_bomb(3)}),
    ("calendar", {**CALENDAR, "future": reference_bomb(3)}),
    ("instrument", {**INSTRUMENT, "instruments": {"market": reference_bomb(3)}}),
    ("instrument", {**INSTRUMENT, "instruments": {"market": "csi300", reference_bomb(3, kind=tuple): 1}}),
    ("instrument", {**INSTRUMENT, "instruments": {"market": "csi300", "filter_pipe": [
        {"filter_type": "NameDFilter", "name_rule_re": "SH", reference_bomb(3, kind=tuple): 1}]}}),
    ("feature", {**FEATURE, "instruments": [reference_bomb(3)]}),
    ("feature", {**FEATURE, "disk_cache": reference_bomb(3)}),
], ids=["freq", "future", "market", "config-key", "filter-key", "code", "disk_cache"])
def test_reference_bombs_are_refused_without_expanding_them(kind, body):
    payload = pickle.dumps(body, protocol=4)
    message, seconds, peak = measured_refusal(kind, payload)
    print(f"{len(payload)}-byte pickle (str() would be {64 ** 3 * 104 >> 20} MiB) refused in {seconds * 1000:.0f} ms, "
          f"peak {peak >> 20} MiB")
    assert peak < BOMB_MEMORY


def test_a_memo_index_far_beyond_the_pickle_allocates_nothing():
    # None, LONG_BINPUT 4,194,304, POP, EMPTY_LIST: 11 bytes that make the C unpickler build a 64 MiB memo
    payload = b"\x80\x04Nr" + struct.pack("<I", 1 << 22) + b"0]."
    message, seconds, peak = measured_refusal("calendar", payload)
    print(f"memo index 2**22 refused in {seconds * 1000:.0f} ms, peak {peak >> 20} MiB: {message}")
    assert peak < BOMB_MEMORY


@pytest.mark.parametrize("payload", [
    b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"x.",  # BINBYTES8 claiming 4 EiB
    b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"x.",  # BINUNICODE8 claiming 1 TiB
    b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"}.",  # FRAME claiming 1 EiB
    b"\x80\x02B" + struct.pack("<I", 0xFFFFFFFF) + b"x.",  # BINBYTES claiming 4 GiB
], ids=["BINBYTES8", "BINUNICODE8", "FRAME", "BINBYTES"])
def test_pickles_claiming_huge_sizes_are_refused(payload):
    assert "not a valid pickle" in refusal("calendar", payload)


@pytest.mark.parametrize("text", ["[" * 200_000, '{"a":' * 100_000, '{"freq": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_deeply_nested_json_is_refused(text):
    message, seconds, _ = measured_refusal("calendar", text)
    print(f"nested JSON refused in {seconds * 1000:.0f} ms: {message[:80]}")


# --- path escape -------------------------------------------------------------------------------------

ESCAPING_NAMES = ["../../etc", "csi300/../../x", "/etc", "/etc/passwd", "..", ".", "../x", "csi300\x00", "a\x00b",
                  "C:\\Windows", "a\\b", "~root", "$HOME", "csi300\n", "csi300\r\n", "SH600000/", "%2e%2e", ""]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
@pytest.mark.parametrize("kind", ["instrument", "feature"])
def test_markets_that_could_leave_the_data_directory_are_refused(name, kind):
    for encoding in ("pickle", "json", "dict"):
        body = {**BODIES[kind], "instruments": {"market": name, "filter_pipe": []}}
        assert "market" in refusal(kind, encode(body, encoding))


@pytest.mark.parametrize("code", ESCAPING_NAMES + ["../../../etc/passwd", "SH600000/../../x", "..a"])
def test_instrument_codes_that_could_leave_the_data_directory_are_refused(code):
    for instruments in ([code], ["SH600000", code], code, {code}):
        for encoding in ("pickle", "dict"):
            assert "instrument" in refusal("feature", encode({**FEATURE, "instruments": instruments}, encoding))


@pytest.mark.parametrize("freq", ["day/../../x", "../day", "/day", "day\x00", "day\n", "1min/..", "day/", "~day"])
@pytest.mark.parametrize("kind", ["calendar", "instrument", "feature"])
def test_freqs_that_could_leave_the_data_directory_are_refused(freq, kind):
    assert "freq" in refusal(kind, {**BODIES[kind], "freq": freq})


@pytest.mark.parametrize("expression", [
    "ChangeInstrument('../x', $close)", "ChangeInstrument('/etc/passwd', $close)", "ChangeInstrument('..', $close)",
    "ChangeInstrument('a/b', $close)", "ChangeInstrument('SH600000\\x00', $close)", "Mask($close, '../x')",
    "Mask($close, '/etc')", "TResample($close, '../x', 'last')", "TResample($close, 'day/..', 'last')",
    "Feature('../x')", "PFeature('/etc/passwd')", "$../x", "$close/../x",
])
def test_expression_strings_that_could_leave_the_data_directory_are_refused(expression):
    assert "expression refused" in refusal("feature", {**FEATURE, "fields": [expression]})
    assert "expression refused" in refusal("instrument", with_filter("instrument", expression))


def test_path_escapes_are_refused_before_any_task_exists(request_path):
    requests = [("instrument", {**INSTRUMENT, "instruments": {"market": m}}) for m in ESCAPING_NAMES]
    requests += [("feature", {**FEATURE, "instruments": [c]}) for c in ESCAPING_NAMES]
    requests += [(k, {**BODIES[k], "freq": "day/../../x"}) for k in BODIES]
    requests += [("feature", {**FEATURE, "fields": ["ChangeInstrument('../x', $close)"]})]
    for kind, body in requests:
        sid = request_path.new_sid()
        request_path.listener.on_request(kind, sid, {"head": HEAD, "body": encode(body, "pickle")})
        answers = [answer for _, answer in request_path.responses[sid]]
        assert [a["status"] for a in answers] == [1] and answers[0]["detailed_info"], (kind, body, answers)
    assert request_path.take_tasks() == []


# --- resource limits ---------------------------------------------------------------------------------

SMALL = make_parser(make_config(provider_uri="/nonexistent/qlib-data", max_body_bytes=4096, max_fields=3,
                                max_instruments=5, max_expression_length=64, max_expression_depth=4))


def test_bodies_over_max_body_bytes_are_refused_in_every_form():
    big = {**FEATURE, "fields": ["$close"] * 3, "pad": "x" * 5000}
    for body in (json.dumps(big), pickle.dumps(big), bytearray(pickle.dumps(big))):
        assert "over the limit of 4096" in refusal("feature", body, SMALL)
    assert "over the limit of 1048576" in refusal("feature", "x" * ((1 << 20) + 1))
    assert "over the limit of 1048576" in refusal("feature", b"\x80" * ((1 << 20) + 1))


def test_too_many_fields_instruments_or_filters_are_refused():
    assert "1 to 3 expressions" in refusal("feature", {**FEATURE, "fields": ["$close"] * 4}, SMALL)
    many = [f"Ref($close, {i})" for i in range(1025)]
    assert "1 to 1024 expressions, got 1025" in refusal("feature", {**FEATURE, "fields": many})
    assert "1 to 5 codes" in refusal("feature", {**FEATURE, "instruments": [f"SH{i}" for i in range(6)]}, SMALL)
    assert "1 to 20000 codes, got 20001" in refusal("feature", {**FEATURE, "instruments": [f"SH{i}" for i in
                                                                                           range(20001)]})
    name_filter = {"filter_type": "NameDFilter", "name_rule_re": "SH"}
    assert "at most 16 filters" in refusal("instrument", {**INSTRUMENT, "instruments": {
        "market": "csi300", "filter_pipe": [name_filter] * 17}})
    assert "at most 200 characters" in refusal("instrument", {**INSTRUMENT, "instruments": {
        "market": "csi300", "filter_pipe": [{**name_filter, "name_rule_re": "S" * 201}]}})


def test_every_refusal_by_a_configurable_limit_names_the_config_key_to_set():
    over = {
        "max_body_bytes": ("feature", json.dumps({**FEATURE, "pad": "x" * 5000})),
        "max_fields": ("feature", {**FEATURE, "fields": ["$close"] * 4}),
        "max_instruments": ("feature", {**FEATURE, "instruments": [f"SH{i}" for i in range(6)]}),
        "max_expression_length": ("feature", {**FEATURE, "fields": ["$close+" * 10 + "1"]}),
        "max_expression_depth": ("instrument", with_filter("instrument", "Abs(" * 5 + "$close" + ")" * 5)),
    }
    for key, (kind, body) in over.items():
        message = refusal(kind, body, SMALL)
        assert f"the server's {key}" in message, (key, message)
    assert "the server's max_body_bytes" in refusal("feature", pickle.dumps({**FEATURE, "pad": "x" * 5000}), SMALL)


def alpha_fields() -> list[str]:
    """Every field of Qlib's Alpha158 and Alpha360 handlers and their default labels."""
    from qlib.contrib.data.handler import Alpha158, Alpha360
    from qlib.contrib.data.loader import Alpha158DL, Alpha360DL

    labels = [Alpha158.get_label_config(None)[0][0], Alpha360.get_label_config(None)[0][0]]
    return Alpha158DL.get_feature_config()[0] + Alpha360DL.get_feature_config()[0] + labels


def test_alpha158_and_alpha360_with_labels_over_max_instruments_codes_pass_the_default_limits():
    fields = alpha_fields()
    assert len(fields) == 158 + 360 + 2 and len(fields) * 1.9 < 1024  # the default max_fields, with room to spare
    body = {**FEATURE, "fields": fields, "instruments": [f"SH{600000 + i}" for i in range(20000)]}
    for encoded in (encode(body, "pickle"), encode(body, "json")):
        assert len(encoded) < (1 << 20) / 3  # the default max_body_bytes, with room to spare
        request = PARSER.parse("feature", {"head": HEAD, "body": encoded})
        assert request.args["fields"] == fields and len(request.args["instruments"]) == 20000
    widest = {**FEATURE, "fields": [f"Ref($close, {i})/$close" for i in range(1024)]}  # max_fields fields
    assert len(PARSER.parse("feature", {"head": HEAD, "body": encode(widest, "pickle")}).args["fields"]) == 1024


def test_expressions_too_long_or_too_deep_are_refused_with_the_limit_named():
    assert "longer than 64 characters" in refusal("feature", {**FEATURE, "fields": ["$close+" * 10 + "1"]}, SMALL)
    assert "longer than 2000 characters" in refusal("feature", {**FEATURE, "fields": ["+".join(["$close"] * 300)]})
    assert "deeper than 4 levels" in refusal("feature", {**FEATURE, "fields": ["Abs(" * 5 + "$close" + ")" * 5]}, SMALL)
    assert "deeper than 32 levels" in refusal("feature", {**FEATURE, "fields": ["(" * 33 + "$close" + ")" * 33]})
    deep_rule = with_filter("instrument", "Abs(" * 40 + "$close" + ")" * 40)
    assert "deeper than 32 levels" in refusal("instrument", deep_rule)


@pytest.mark.parametrize("value, says", [
    ("99999-01-01", "is not a date"), ("1000-01-01", "outside 1900..2200"), ("9999-12-31", "outside 1900..2200"),
    ("1e400", "is not a date"), ("2019-02-30", "is not a date"), ("2019-01-01T00:00:00+08:00", "naive date"),
    (dt.date(1, 1, 1), "start_time"), (dt.datetime(9999, 1, 1), "outside 1900..2200"),
])
def test_absurd_dates_are_refused_with_the_field_named(value, says):
    for kind in BODIES:
        message = refusal(kind, pickle.dumps({**BODIES[kind], "start_time": value}))
        assert "start_time" in message and says in message


def test_the_in_flight_limit_holds_when_one_connections_requests_interleave(request_path_factory):
    # Under gevent every event runs in its own greenlet and switches at each Redis call; here threads
    # stand in for greenlets, and the result cache lets a request go on only once every request of
    # the connection has reached it or been answered: the interleaving a flood gets on a real server.
    path = request_path_factory(max_inflight_per_client=2)
    sid, sent = "flooder", 6
    gate = threading.Condition()

    class InterleavingCache(ResultCache):
        arrived = 0

        def get(self, key, *args):
            with gate:
                self.arrived += 1
                deadline = time.monotonic() + 10
                while self.arrived + len(path.responses[sid]) < sent and time.monotonic() < deadline:
                    gate.wait(0.01)  # refusals are emitted without notifying: look again shortly
            return super().get(key, *args)

    path.listener.cache = InterleavingCache(path.redis, 60)
    bodies = [{**FEATURE, "fields": [f"Ref($close, {i + 1})"]} for i in range(sent)]
    threads = [threading.Thread(target=path.listener.on_request, args=("feature", sid, {"head": HEAD, "body": b}))
               for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    refused = [a for _, a in path.responses[sid] if "too many requests in flight" in (a["detailed_info"] or "")]
    tasks = path.take_tasks()
    print(f"{sent} interleaved requests, limit 2: {len(tasks)} queued, {len(refused)} refused")
    assert len(tasks) == 2 and len(refused) == sent - 2
    assert all("the server's max_inflight_per_client" in a["detailed_info"] for a in refused)


def test_feature_start_after_end_is_refused():
    message = refusal("feature", {**FEATURE, "start_time": "2020-01-01", "end_time": "2019-01-01"})
    assert "is after end_time" in message


# --- malformed input ---------------------------------------------------------------------------------

HUGE = 10 ** 5000  # str() of it raises ValueError in Python >= 3.11
DEEP = json.loads("[" * 200 + "]" * 200)  # deep enough to hurt a recursive check, not pickle.dumps


def short_ids(values) -> list[str]:
    """Test ids that never str() the value (pytest's own ids would choke on HUGE)."""
    return [f"{i}-{type(v).__name__}" for i, v in enumerate(values)]


MALFORMED_EVENTS = [None, [], [HEAD, CALENDAR], "calendar", b"\x00\xff", 42, HUGE, 1.5,
                    {"head": None, "body": CALENDAR}, {"head": HEAD}, {"body": CALENDAR},
                    {"head": {"version": HUGE}, "body": CALENDAR}, {"head": {"version": DEEP}, "body": {}},
                    {"head": {"version": "0.9.7" * 100}, "body": CALENDAR}]
MALFORMED_BODIES = [None, [], [CALENDAR], 42, HUGE, 1.5, True, b"", b"\xff\xfe\xfd not utf-8 \x80", bytes(range(256)),
                    b"\x80\x04\x95\x00\xff junk", "not json", '{"freq": ', "\ud800", json.dumps([1, 2]),
                    '{"freq": 1' + "0" * 5000 + "}", b'{"freq": "day"}', "caf\xe9".encode("latin-1")]


@pytest.mark.parametrize("payload", MALFORMED_EVENTS, ids=short_ids(MALFORMED_EVENTS))
def test_malformed_events_are_refused(payload):
    with pytest.raises(RequestError) as info:
        PARSER.parse("calendar", payload)
    assert info.value.status == 1 and 0 < len(str(info.value)) <= MAX_MESSAGE


@pytest.mark.parametrize("body", MALFORMED_BODIES, ids=short_ids(MALFORMED_BODIES))
def test_malformed_bodies_are_refused(body):
    refusal("calendar", body)


WRONG = {
    "calendar": {
        "start_time": [1, 1.5, [], {}, b"2019", True, HUGE, DEEP, ["2019-01-01"]],
        "freq": [None, 1, 1.5, [], {}, b"day", True, HUGE, DEEP, ["day"], {"day": 1}],
        "future": ["yes", 2, 1.5, [], {}, b"1", None, HUGE, DEEP, [True]],
    },
    "instrument": {
        "instruments": [None, 1, "csi300", ["csi300"], {}, {"market": None}, {"market": HUGE}, {"market": DEEP},
                        {"market": ["csi300"]}, {"market": "csi300", "filter_pipe": "x"},
                        {"market": "csi300", "filter_pipe": [{"filter_type": ["NameDFilter"]}]},
                        {"market": "csi300", "filter_pipe": [{"filter_type": {"a": 1}}]},
                        {"market": "csi300", "filter_pipe": [None]}, {"market": "csi300", "filter_pipe": [HUGE]},
                        {"market": "csi300", HUGE: 1}, {"market": "csi300", (HUGE,): 1}],
        "as_list": ["yes", 2, [], {}, None, HUGE, DEEP],
    },
    "feature": {
        "instruments": [None, 1, {}, [], [None], [HUGE], [DEEP], [["SH600000"]], {"market": {}}, b"SH600000",
                        {"market": "csi300", "filter_pipe": [{"filter_type": ["ExpressionDFilter"]}]}],
        "fields": [None, 1, "", [], [None], [1], [HUGE], [DEEP], [["$close"]], {"$close"}, b"$close", [b"$close"]],
        "disk_cache": [2, -1, "1", 1.0, None, [], {}, HUGE, DEEP, b"1"],
    },
}
WRONG_CASES = [(kind, key, i) for kind, keys in WRONG.items() for key, values in keys.items()
               for i in range(len(values))]


@pytest.mark.parametrize("kind, key, i", WRONG_CASES, ids=[f"{k}.{key}.{i}" for k, key, i in WRONG_CASES])
@pytest.mark.parametrize("encoding", ["pickle", "dict"])
def test_wrong_types_are_refused_in_every_slot(kind, key, i, encoding):
    body = {**BODIES[kind], key: WRONG[kind][key][i]}
    refusal(kind, encode(body, encoding))


@pytest.mark.parametrize("kind, key", [("instrument", "instruments"), ("feature", "instruments"),
                                       ("feature", "fields")])
def test_missing_required_keys_are_refused(kind, key):
    assert key in refusal(kind, {k: v for k, v in BODIES[kind].items() if k != key})


def test_refusals_echo_only_a_short_prefix_of_hostile_input():
    long_name = "x" * 200_000
    refusal("instrument", {**INSTRUMENT, "instruments": {"market": "csi300", long_name: 1}})
    refusal("instrument", {**INSTRUMENT, "instruments": {"market": "csi300", "filter_pipe": [
        {"filter_type": "NameDFilter", "name_rule_re": "SH", long_name: 1}]}})
    m, n = b"os" * 50_000, b"system"
    refusal("calendar", b"\x80\x04\x8d" + struct.pack("<Q", len(m)) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93)R.")
    refusal("calendar", "[" + "1," * 100_000 + "x]")
