"""Tests of the wire protocol: decoding in every encoding, refusals, version checks and canonical keys."""

import datetime as dt
import json
import os
import pickle
from collections import OrderedDict

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib_server.config import make_config
from qlib_server.errors import RequestError
from qlib_server.expressions import start_matters
from qlib_server.front.handler import make_parser
from qlib_server.protocol import Limits, RequestParser, check_version, request_key, response
from qlib_server.safe_pickle import safe_unpickle

PARSER = make_parser(make_config(provider_uri="/tmp/x"))
PYQLIB_PICKLE_PROTOCOL = 4  # qlib.config.C.dump_protocol_version, what pyqlib 0.9.7's Client.send_request uses
HEAD = {"version": "0.9.7"}


def pyqlib_body(body: dict) -> bytes:
    """The body exactly as pyqlib 0.9.7's Client.send_request encodes it."""
    return pickle.dumps(body, protocol=PYQLIB_PICKLE_PROTOCOL)


def encode(body: dict, encoding: str):
    """The body as a pickle (released pyqlib), a JSON string (Qlib's main branch) or a plain mapping."""
    if encoding == "pickle":
        return pyqlib_body(body)
    if encoding == "json":
        return json.dumps(body, default=str)
    return body


def parse(kind: str, body, version: str = "0.9.7", parser: RequestParser = PARSER):
    return parser.parse(kind, {"head": {"version": version}, "body": body})


def refused(kind: str, payload, parser: RequestParser = PARSER) -> str:
    """Parse a whole event that must be refused; return the message the client would read."""
    with pytest.raises(RequestError) as info:
        parser.parse(kind, payload)
    assert info.value.status == 1
    return str(info.value)


def refused_body(kind: str, body, parser: RequestParser = PARSER) -> str:
    return refused(kind, {"head": HEAD, "body": body}, parser)


CALENDAR = {"start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "future": False}
INSTRUMENT = {
    "instruments": {"market": "csi300", "filter_pipe": []},
    "start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "as_list": True,
}
FEATURE = {
    "instruments": {"market": "csi300", "filter_pipe": []},
    "fields": ["$close", "Mean($close, 5)"],
    "start_time": "2019-01-01", "end_time": "2019-12-31", "freq": "day", "disk_cache": 1,
}
BODIES = {"calendar": CALENDAR, "instrument": INSTRUMENT, "feature": FEATURE}


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
@pytest.mark.parametrize("kind", ["calendar", "instrument", "feature"])
def test_each_request_type_decodes_in_each_encoding(kind, encoding):
    request = parse(kind, encode(BODIES[kind], encoding))
    assert request.type == kind
    assert request.version == "0.9.7"
    assert request.args["start_time"] == "2019-01-01 00:00:00"
    assert request.args["end_time"] == "2019-12-31 00:00:00"
    task = request.task()
    assert (task["key"], task["type"], task["args"]) == (request.key, kind, request.args)
    assert json.loads(json.dumps(task))["args"] == request.args  # the task travels as JSON


def test_pyqlib_feature_pickle_with_timestamps_and_datetimes_decodes():
    body = {
        "instruments": {"market": "CSI300", "filter_pipe": []},
        "fields": ["$close", "Ref($close, 1)"],
        "start_time": pd.Timestamp("2019-01-02"),
        "end_time": dt.datetime(2019, 6, 28, 15, 0),
        "freq": "day",
        "disk_cache": 0,
    }
    request = parse("feature", pyqlib_body(body))
    assert request.args == {
        "instruments": {"market": "csi300", "filter_pipe": []},
        "fields": ["$close", "Ref($close, 1)"],
        "start_time": "2019-01-02 00:00:00",
        "end_time": "2019-06-28 15:00:00",
        "freq": "day",
        "disk_cache": 0,
    }


def test_pyqlib_calendar_pickle_with_none_written_as_a_string_decodes():
    # ClientCalendarProvider sends str(start_time), so a missing date arrives as "None"
    body = {"start_time": str(None), "end_time": str(None), "freq": "day", "future": True}
    request = parse("calendar", pyqlib_body(body))
    assert request.args == {"start_time": None, "end_time": None, "freq": "day", "future": True}


def test_pyqlib_instrument_pickle_with_filter_pipe_and_dates_decodes():
    from qlib.data.filter import ExpressionDFilter, NameDFilter

    pipe = [NameDFilter(name_rule_re="SH60.*").to_config(),
            ExpressionDFilter(rule_expression="$close>10", fstart_time=pd.Timestamp("2019-01-02")).to_config()]
    body = {"instruments": {"market": "all", "filter_pipe": pipe}, "start_time": str(pd.Timestamp("2019-01-02")),
            "end_time": str(None), "freq": "day", "as_list": False}
    request = parse("instrument", pyqlib_body(body))
    name_filter, expression_filter = request.args["instruments"]["filter_pipe"]
    assert name_filter["filter_type"] == "NameDFilter" and name_filter["name_rule_re"] == "SH60.*"
    assert expression_filter["rule_expression"] == "$close>10"
    assert expression_filter["filter_start_time"] == "2019-01-02 00:00:00"
    assert request.args["start_time"] == "2019-01-02 00:00:00" and request.args["end_time"] is None
    assert request.args["as_list"] is False


def test_feature_instruments_may_be_a_list_set_or_single_code():
    for instruments in (["SZ000001", "SH600000"], ("SH600000", "SZ000001"), {"SH600000", "SZ000001"}):
        request = parse("feature", pyqlib_body({**FEATURE, "instruments": instruments}))
        assert request.args["instruments"] == ["SH600000", "SZ000001"]
    assert parse("feature", {**FEATURE, "instruments": "SH600000"}).args["instruments"] == ["SH600000"]


def test_defaults_fill_missing_optional_keys():
    assert parse("calendar", {}).args == {"start_time": None, "end_time": None, "freq": "day", "future": False}
    args = parse("feature", {"instruments": ["SH600000"], "fields": "$close"}).args
    assert args["fields"] == ["$close"] and args["disk_cache"] == 1 and args["freq"] == "day"


def test_response_envelope_has_the_three_keys_pyqlib_reads():
    assert response(["2020-01-02"]) == {"result": ["2020-01-02"], "status": 0, "detailed_info": None}
    assert response(None, 1, "bad") == {"result": None, "status": 1, "detailed_info": "bad"}


# --- refusals: encodings --------------------------------------------------------------------------


class SystemCall:
    """A pickle that runs a shell command when loaded (the classic exploit)."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


class EvalCall:
    """A pickle that calls eval when loaded."""

    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


class NotARequest:
    """An ordinary class no request may contain."""


@pytest.mark.parametrize("payload, named", [
    (pickle.dumps(os.system, protocol=4), "system"),
    (pickle.dumps({**CALENDAR, "start_time": SystemCall()}, protocol=4), "system"),
    (pickle.dumps(SystemCall(), protocol=0), "system"),
    (b"cos\nsystem\n(S'echo pwned'\ntR.", "system"),
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "eval"),
    (pickle.dumps(EvalCall(), protocol=4), "eval"),
    (pickle.dumps(getattr, protocol=4), "getattr"),
    (pickle.dumps(NotARequest(), protocol=4), "NotARequest"),
    (pickle.dumps(OrderedDict(CALENDAR), protocol=4), "OrderedDict"),
    (pickle.dumps({**CALENDAR, "start_time": pd.Series([1.0])}, protocol=4), "pandas"),
])
def test_pickle_referring_to_anything_outside_the_allow_list_is_refused(payload, named):
    message = refused_body("calendar", payload)
    assert "may not contain" in message and named in message


def test_refused_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    refused_body("calendar", pickle.dumps({"start_time": Touch()}, protocol=4))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pyqlib_body(FEATURE)[:-5],
    pyqlib_body(FEATURE)[:10],
    b"",
    b"\xff\xfe\xfd\xfc not utf-8 \x80\x81",
    "caf\xe9".encode("latin-1"),
    b'{"start_time": "2019-01-01"}',  # JSON sent as bytes is taken for a pickle
])
def test_truncated_or_junk_bytes_are_refused_as_invalid_pickle(payload):
    assert "not a valid pickle" in refused_body("feature", payload)


@pytest.mark.parametrize("text", ['{"start_time": ', "not json", "[1, 2", "\ud800"])
def test_invalid_json_text_is_refused(text):
    assert "not valid JSON" in refused_body("calendar", text)


def test_bodies_over_max_body_bytes_are_refused_in_every_encoding():
    parser = make_parser(make_config(provider_uri="/tmp/x", max_body_bytes=2048))
    big = {**FEATURE, "fields": [f"Ref($close, {i})" for i in range(200)]}
    assert "over the limit of 2048" in refused_body("feature", pyqlib_body(big), parser)
    assert "over the limit of 2048" in refused_body("feature", json.dumps(big), parser)
    # the same small body is fine
    assert parse("feature", pyqlib_body(FEATURE), parser=parser).type == "feature"


def test_unpickle_limit_is_checked_before_loading():
    with pytest.raises(RequestError, match="over the limit of 10"):
        safe_unpickle(pickle.dumps(list(range(100))), 10)


@pytest.mark.parametrize("body", [None, 42, 1.5, [CALENDAR], json.dumps([1, 2]), json.dumps("text"), ("a", "b")])
def test_bodies_that_are_not_mappings_are_refused(body):
    message = refused_body("calendar", body)
    assert "body" in message


@pytest.mark.parametrize("payload", [
    None, "calendar", [HEAD, CALENDAR], {"body": CALENDAR}, {"head": HEAD}, {"head": "0.9.7", "body": CALENDAR},
])
def test_events_without_head_and_body_are_refused(payload):
    assert '{"head": {"version": ...}, "body": ...}' in refused("calendar", payload)


@pytest.mark.parametrize("head", [{}, {"version": None}, {"version": 97}, {"version": ["0.9.7"]}, {"v": "0.9.7"}])
def test_missing_or_non_string_version_is_refused(head):
    assert "version" in refused("calendar", {"head": head, "body": CALENDAR})


def test_unknown_request_type_is_refused():
    assert "unknown request type 'delete'" in refused("delete", {"head": HEAD, "body": CALENDAR})


# --- refusals: values -----------------------------------------------------------------------------


@pytest.mark.parametrize("market", ["../etc", "../../etc/passwd", "csi300/../all", "a b", "", ".hidden", "x" * 65,
                                    "csi\x00300", 300, None, ["csi300"]])
def test_unknown_market_characters_are_refused(market):
    for kind in ("instrument", "feature"):
        body = {**BODIES[kind], "instruments": {"market": market, "filter_pipe": []}}
        message = refused_body(kind, body)
        assert "market" in message and "not a valid name" in message


@pytest.mark.parametrize("codes", [["SH600000", "../etc"], ["SH 600000"], [], [1, 2]])
def test_bad_instrument_codes_are_refused(codes):
    message = refused_body("feature", {**FEATURE, "instruments": codes})
    assert "instrument" in message


def test_too_many_instrument_codes_are_refused():
    parser = RequestParser(">=0.4.0", Limits(max_instruments=3), PARSER.check_expression)
    assert "1 to 3 codes" in refused_body("feature", {**FEATURE, "instruments": ["A1", "A2", "A3", "A4"]}, parser)


@pytest.mark.parametrize("freq", ["daily", "1h", "../day", "", "day;rm", None, 1, "d" * 100])
def test_bad_freq_is_refused(freq):
    for kind in ("calendar", "instrument", "feature"):
        assert "freq must be a frequency" in refused_body(kind, {**BODIES[kind], "freq": freq})


@pytest.mark.parametrize("freq, normalised", [("day", "day"), ("1min", "1min"), ("Day", "day"), ("week", "week")])
def test_good_freqs_are_accepted(freq, normalised):
    assert parse("calendar", {**CALENDAR, "freq": freq}).args["freq"] == normalised


@pytest.mark.parametrize("value, says", [
    ("99999-01-01", "is not a date"),
    ("not a date", "is not a date"),
    ("2019-13-45", "is not a date"),
    ("1066-10-14", "outside 1900..2200"),
    (dt.datetime(9999, 12, 31), "outside 1900..2200"),
    (pd.Timestamp("2262-01-01"), "outside 1900..2200"),
    ("2019-01-01T00:00:00+08:00", "naive date"),
    (20190101, "must be a date or a date string"),
    (["2019-01-01"], "must be a date or a date string"),
    ("2019-01-01" * 10, "must be a date or a date string"),
])
def test_absurd_dates_are_refused_with_the_field_named(value, says):
    for kind in ("calendar", "instrument", "feature"):
        for field in ("start_time", "end_time"):
            message = refused_body(kind, {**BODIES[kind], field: value})
            assert field in message and says in message


@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
def test_feature_start_after_end_is_refused(encoding):
    body = {**FEATURE, "start_time": pd.Timestamp("2020-01-01"), "end_time": dt.datetime(2019, 1, 1)}
    message = refused_body("feature", encode(body, encoding))
    assert "start_time 2020-01-01 00:00:00 is after end_time 2019-01-01 00:00:00" in message


@pytest.mark.parametrize("kind, key, value, says", [
    ("calendar", "future", "maybe", "future must be true or false"),
    ("calendar", "future", 2, "future must be true or false"),
    ("instrument", "as_list", "yes", "as_list must be true or false"),
    ("feature", "disk_cache", 2, "disk_cache must be 0 or 1"),
    ("feature", "disk_cache", "1", "disk_cache must be 0 or 1"),
    ("feature", "disk_cache", 1.0, "disk_cache must be 0 or 1"),
    ("feature", "fields", 42, "fields must be a list"),
    ("feature", "fields", [], "fields must be a list"),
    ("feature", "fields", [42], "a field must be an expression string, not int"),
    ("feature", "fields", {"$close": 1}, "fields must be a list"),
    ("feature", "instruments", 42, "instruments must be a market config or a list"),
    ("feature", "instruments", None, "instruments must be a market config or a list"),
    ("instrument", "instruments", ["SH600000"], "instruments must be a market config"),
    ("instrument", "instruments", {"market": "all", "extra": 1}, "unknown keys in instruments config: ['extra']"),
    ("instrument", "instruments", {"market": "all", "filter_pipe": "NameDFilter"}, "filter_pipe must be a list"),
])
def test_wrong_types_are_refused_with_the_key_named(kind, key, value, says):
    assert says in refused_body(kind, {**BODIES[kind], key: value})


@pytest.mark.parametrize("pipe_item, says", [
    ({"filter_type": "EvalFilter", "code": "1"}, "filter_type"),
    ("NameDFilter", "filter_type"),
    ({"filter_type": "NameDFilter", "name_rule_re": "("}, "not a regular expression"),
    ({"filter_type": "NameDFilter", "name_rule_re": 5}, "name_rule_re"),
    ({"filter_type": "NameDFilter", "name_rule_re": "SH", "extra": 1}, "unknown keys"),
    ({"filter_type": "ExpressionDFilter", "rule_expression": '__import__("os")'},
     "'__import__' is not a Qlib operator"),
    ({"filter_type": "ExpressionDFilter", "rule_expression": None}, "rule_expression"),
    ({"filter_type": "ExpressionDFilter", "rule_expression": "$close>10", "keep": "x"}, "keep"),
])
def test_bad_filters_are_refused(pipe_item, says):
    body = {**INSTRUMENT, "instruments": {"market": "all", "filter_pipe": [pipe_item]}}
    assert says in refused_body("instrument", body)


@pytest.mark.parametrize("field", ['__import__("os").system("id")', "$close.__class__", "open('/etc/passwd')",
                                   "Mean($close, 5", "$close ** 2", "lambda: 1"])
def test_unsafe_or_broken_fields_are_refused(field):
    assert refused_body("feature", {**FEATURE, "fields": ["$close", field]}).startswith("expression refused")


def test_too_many_fields_are_refused():
    parser = RequestParser(">=0.4.0", Limits(max_fields=2), PARSER.check_expression)
    assert "1 to 2 expressions" in refused_body("feature", {**FEATURE, "fields": ["$open", "$high", "$low"]}, parser)


# --- versions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "0.9.7", "0.9.7.dev", "0.9.99.dev", "0.9.8.dev12", "1.0", "0.9.6.99"])
def test_versions_inside_the_spec_are_accepted(version):
    assert check_version(version, ">=0.4.0") == version
    assert parse("calendar", CALENDAR, version=version).version == version


@pytest.mark.parametrize("version", ["0.1.0", "0.3.9", "0.3.9.dev", "0.0.1.dev5"])
def test_versions_outside_the_spec_are_refused_with_the_spec_named(version):
    with pytest.raises(RequestError) as info:
        check_version(version, ">=0.4.0")
    assert str(info.value) == (f"client version {version} is not supported (server accepts qlib >=0.4.0); "
                               "please upgrade")


def test_version_spec_with_an_upper_bound():
    assert check_version("0.9.7", ">=0.9,<1.0") == "0.9.7"
    with pytest.raises(RequestError, match=r"server accepts qlib >=0.9,<1.0"):
        check_version("1.2.0", ">=0.9,<1.0")


@pytest.mark.parametrize("version", ["abc", "", "0.9.7-bogus!", "latest", ".dev", "9.9.9.9.x"])
def test_invalid_version_strings_are_refused(version):
    with pytest.raises(RequestError, match="is not a valid version"):
        check_version(version, ">=0.4.0")


@pytest.mark.parametrize("version", [None, 97, 0.97, ["0.9.7"], "1" * 65])
def test_non_string_or_huge_versions_are_refused(version):
    with pytest.raises(RequestError, match="version as a string"):
        check_version(version, ">=0.4.0")


def test_parser_enforces_the_configured_client_version():
    parser = make_parser(make_config(provider_uri="/tmp/x", client_version=">=0.9.0"))
    assert "server accepts qlib >=0.9.0" in refused("calendar", {"head": {"version": "0.8.6"}, "body": CALENDAR},
                                                    parser)


# --- canonical keys -------------------------------------------------------------------------------

MARKETS = ["csi300", "csi100", "all", "sp500"]
FIELD_POOL = ["$close", "$open", "$volume", "Mean($close, 5)", "Ref($close, 1)", "$close / Ref($close, 1) - 1",
              "Std($volume, 20)", "Corr($close, Log($volume + 1), 10)"]
CODES = ["SH600000", "SH600002", "SZ000001", "SZ000003", "SH600004"]

days = st.dates(min_value=dt.date(1995, 1, 1), max_value=dt.date(2100, 12, 31))
encoding_pairs = st.tuples(st.sampled_from(["pickle", "json", "dict"]), st.sampled_from(["pickle", "json", "dict"]))


@st.composite
def same_date_two_ways(draw):
    """A midnight date written in two of the forms a client may use."""
    day = draw(days)
    forms = [day.isoformat(), f"{day.isoformat()} 00:00:00", f"{day.isoformat()}T00:00:00",
             dt.datetime(day.year, day.month, day.day), pd.Timestamp(day)]
    return draw(st.sampled_from(forms)), draw(st.sampled_from(forms))


def respace(field: str, draw) -> str:
    """The same expression with different spaces around commas, brackets and operators."""
    out = field.replace(" ", "")
    for token in (",", "(", ")", "/", "-", "+"):
        out = out.replace(token, draw(st.sampled_from(["", " "])) + token + draw(st.sampled_from(["", " "])))
    return out


def key_of(kind: str, body: dict, encoding: str = "dict") -> str:
    return parse(kind, encode(body, encoding)).key


@given(start=same_date_two_ways(), end=same_date_two_ways(), future=st.booleans(),
       encodings=encoding_pairs)
@settings(max_examples=150, deadline=None)
def test_equivalent_calendar_requests_share_a_key(start, end, future, encodings):
    a = {"start_time": start[0], "end_time": end[0], "freq": "day", "future": future}
    b = {"start_time": start[1], "end_time": end[1], "freq": "day", "future": future}
    assert key_of("calendar", a, encodings[0]) == key_of("calendar", b, encodings[1])


@given(data=st.data(), market=st.sampled_from(MARKETS), start=same_date_two_ways(), as_list=st.booleans(),
       encodings=encoding_pairs)
@settings(max_examples=100, deadline=None)
def test_equivalent_instrument_requests_share_a_key(data, market, start, as_list, encodings):
    cased = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in market)
    pipe = [{"filter_type": "NameDFilter", "name_rule_re": "SH.*", "filter_start_time": None, "filter_end_time": None}]
    a = {"instruments": {"market": market, "filter_pipe": pipe}, "start_time": start[0], "end_time": None,
         "freq": "day", "as_list": as_list}
    b = {"instruments": {"market": cased, "filter_pipe": pipe}, "start_time": start[1], "end_time": "None",
         "freq": "day", "as_list": as_list}
    assert key_of("instrument", a, encodings[0]) == key_of("instrument", b, encodings[1])


@st.composite
def feature_pair(draw):
    """Two feature bodies a server must answer identically, and the encodings to send them in."""
    fields = draw(st.lists(st.sampled_from(FIELD_POOL), min_size=1, max_size=5, unique=True))
    other_fields = [respace(f, draw) for f in draw(st.permutations(fields))]
    other_fields += draw(st.lists(st.sampled_from(other_fields), max_size=2))  # repeated fields
    if draw(st.booleans()):
        market = draw(st.sampled_from(MARKETS))
        instruments = {"market": market, "filter_pipe": []}
        other_instruments = {"market": market.upper() if draw(st.booleans()) else market}
    else:
        codes = draw(st.lists(st.sampled_from(CODES), min_size=1, max_size=5, unique=True))
        instruments = codes
        other_instruments = list(draw(st.permutations(codes))) + draw(st.lists(st.sampled_from(codes), max_size=3))
    disk_cache = draw(st.sampled_from([0, 1]))
    dates = draw(st.lists(st.one_of(st.none(), days.map(str), days.map(pd.Timestamp)), min_size=4, max_size=4))
    a = {"instruments": instruments, "fields": fields, "start_time": None, "end_time": None, "freq": "day",
         "disk_cache": disk_cache}
    b = {"instruments": other_instruments, "fields": other_fields, "freq": "day", "disk_cache": disk_cache}
    if disk_cache and any(start_matters(f) for f in fields):  # a cache of the request's start: the same start
        dates[2] = dates[0] if dates[0] is None else draw(st.sampled_from([str(dates[0]), pd.Timestamp(dates[0])]))
    for body, (start, end) in ((a, dates[:2]), (b, dates[2:])):
        if start is not None and end is not None and pd.Timestamp(start) > pd.Timestamp(end):
            end = start
        body["start_time"], body["end_time"] = start, end
    encodings = draw(encoding_pairs)
    return a, b, encodings


@given(feature_pair())
@settings(max_examples=200, deadline=None)
def test_equivalent_feature_requests_share_a_key(pair):
    a, b, (encoding_a, encoding_b) = pair
    assert key_of("feature", a, encoding_a) == key_of("feature", b, encoding_b)


def test_feature_key_ignores_dates_in_any_form_when_no_field_depends_on_where_evaluation_starts():
    keys = {key_of("feature", {**FEATURE, "fields": ["$close", "Max($close, 5)"], "start_time": start,
                               "end_time": end}, encoding)
            for start, end in [(None, None), ("2019-01-01", "2019-12-31"), (pd.Timestamp("2018-05-05"), None),
                               (dt.datetime(2010, 1, 1), dt.datetime(2020, 1, 1))]
            for encoding in ("pickle", "json", "dict")}
    assert len(keys) == 1


def test_feature_key_keeps_the_start_in_any_form_but_not_the_end_when_a_field_depends_on_it():
    def keys(starts):
        return {key_of("feature", {**FEATURE, "start_time": start, "end_time": end}, encoding)
                for start in starts for end in (None, "2019-12-31", dt.datetime(2020, 1, 1))
                for encoding in ("pickle", "json", "dict")}

    assert len(keys(["2019-01-01", pd.Timestamp("2019-01-01"), dt.datetime(2019, 1, 1)])) == 1
    assert len(keys([None, "2019-01-01", "2019-01-02"])) == 3


def test_same_body_in_the_three_encodings_shares_a_key():
    for kind, body in BODIES.items():
        body = {**body, "start_time": pd.Timestamp("2019-03-04"), "end_time": dt.datetime(2019, 9, 30)}
        keys = {key_of(kind, body, encoding) for encoding in ("pickle", "json", "dict")}
        assert len(keys) == 1, kind


def different_body(kind: str, change: str, draw) -> tuple[dict, dict]:
    """A body of ``kind`` and a copy that differs in ``change`` only (in a way that changes the answer)."""
    base = dict(BODIES[kind])
    other = dict(base)
    if change == "market":
        market_a, market_b = draw(st.lists(st.sampled_from(MARKETS), min_size=2, max_size=2, unique=True))
        base["instruments"] = {"market": market_a, "filter_pipe": []}
        other["instruments"] = {"market": market_b, "filter_pipe": []}
    elif change == "fields":
        fields_a, fields_b = draw(st.lists(st.frozensets(st.sampled_from(FIELD_POOL), min_size=1), min_size=2,
                                           max_size=2, unique=True))
        base["fields"], other["fields"] = sorted(fields_a), sorted(fields_b)
    elif change == "codes":
        codes_a, codes_b = draw(st.lists(st.frozensets(st.sampled_from(CODES), min_size=1), min_size=2, max_size=2,
                                         unique=True))
        base["instruments"], other["instruments"] = sorted(codes_a), sorted(codes_b)
    elif change == "freq":
        base["freq"], other["freq"] = draw(st.lists(st.sampled_from(["day", "1min", "week", "5min"]), min_size=2,
                                                    max_size=2, unique=True))
    elif change == "disk_cache":
        base["disk_cache"], other["disk_cache"] = 0, 1
    elif change == "as_list":
        base["as_list"], other["as_list"] = True, False
    elif change == "future":
        base["future"], other["future"] = True, False
    elif change == "filter_pipe":
        pipes = [[], [{"filter_type": "NameDFilter", "name_rule_re": "SH.*"}],
                 [{"filter_type": "NameDFilter", "name_rule_re": "SZ.*"}],
                 [{"filter_type": "ExpressionDFilter", "rule_expression": "$close>10"}],
                 [{"filter_type": "ExpressionDFilter", "rule_expression": "$close>10", "keep": True}],
                 [{"filter_type": "ExpressionDFilter", "rule_expression": "$close>10",
                   "filter_start_time": "2019-01-01"}]]
        pipe_a, pipe_b = draw(st.lists(st.sampled_from(range(len(pipes))), min_size=2, max_size=2, unique=True))
        base["instruments"] = {"market": "csi300", "filter_pipe": pipes[pipe_a]}
        other["instruments"] = {"market": "csi300", "filter_pipe": pipes[pipe_b]}
    elif change in ("start_time", "end_time"):
        day_a, day_b = draw(st.lists(st.sampled_from([None, "2019-01-01", "2019-01-02", "2019-06-30 15:00:00"]),
                                     min_size=2, max_size=2, unique=True))
        base[change], other[change] = day_a, day_b
        if change == "start_time":
            base["end_time"] = other["end_time"] = None
    return base, other


CHANGES = {
    "calendar": ["freq", "future", "start_time", "end_time"],
    "instrument": ["market", "freq", "as_list", "filter_pipe", "start_time", "end_time"],
    "feature": ["market", "fields", "codes", "freq", "disk_cache", "filter_pipe"],
}


@given(data=st.data(), kind=st.sampled_from(sorted(CHANGES)),
       encodings=encoding_pairs)
@settings(max_examples=300, deadline=None)
def test_requests_with_different_answers_have_different_keys(data, kind, encodings):
    change = data.draw(st.sampled_from(CHANGES[kind]))
    base, other = different_body(kind, change, data.draw)
    assert key_of(kind, base, encodings[0]) != key_of(kind, other, encodings[1]), change


def test_requests_of_different_types_have_different_keys():
    market = {"market": "csi300", "filter_pipe": []}
    instrument = parse("instrument", {"instruments": market, "start_time": None, "end_time": None, "freq": "day"})
    feature = parse("feature", {"instruments": market, "fields": ["$close"], "freq": "day"})
    calendar = parse("calendar", {"freq": "day"})
    assert len({instrument.key, feature.key, calendar.key}) == 3
    args = {"start_time": None, "end_time": None, "freq": "day"}
    assert len({request_key(kind, args) for kind in ("calendar", "instrument")}) == 2
