"""Feature requests naming instruments by a dict of codes and spans, and carrying Qlib's ``inst_processors``:
what the request parser accepts and refuses, the allow-list, the keys, the cache names, and the wire form
``qlib_server.client`` sends."""

import datetime as dt
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qlib_server import inst_processors
from qlib_server.config import make_config
from qlib_server.errors import ComputeError, ConfigError, RequestError
from qlib_server.front.handler import make_parser
from qlib_server.front.transfer import dataset_uri

PARSER = make_parser(make_config(provider_uri="/tmp/x"))
HEAD = {"version": "0.9.7"}
FEATURE = {"fields": ["$close", "Max($close, 5)"], "start_time": "2019-01-01", "end_time": "2019-12-31",
           "freq": "day", "disk_cache": 1}
# what D.list_instruments returns: codes and (start, end) Timestamps, in the instrument file's order
SPANS = {"SZ000001": [(pd.Timestamp("2019-05-06"), pd.Timestamp("2019-12-31")),
                      (pd.Timestamp("2019-01-02"), pd.Timestamp("2019-03-29"))],
         "SH600000": [(pd.Timestamp("2019-01-02"), pd.Timestamp("2019-12-31"))]}
NORMALISED = {"SH600000": [["2019-01-02 00:00:00", "2019-12-31 00:00:00"]],
              "SZ000001": [["2019-01-02 00:00:00", "2019-03-29 00:00:00"],
                           ["2019-05-06 00:00:00", "2019-12-31 00:00:00"]]}
TIME_RANGE = "qlib.data.dataset.processor.TimeRangeFlt"
CONFIG = {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
          "kwargs": {"start_time": "2019-02-01", "end_time": "2019-11-29"}}


def encode(body: dict, encoding: str):
    if encoding == "pickle":
        return pickle.dumps(body, protocol=4)  # as pyqlib 0.9.7's Client sends a body
    if encoding == "json":
        return json.dumps(body, default=str)
    return body


def parse(body, parser=PARSER, encoding="dict"):
    return parser.parse("feature", {"head": HEAD, "body": encode(body, encoding)})


def refused(body, parser=PARSER) -> str:
    with pytest.raises(RequestError) as info:
        parse(body, parser)
    assert info.value.status == 1
    return str(info.value)


# --- a dict of instruments and spans --------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
def test_a_dict_of_codes_and_spans_as_list_instruments_returns_it_decodes_in_each_encoding(encoding):
    args = parse({**FEATURE, "instruments": SPANS}, encoding=encoding).args
    assert args["instruments"] == NORMALISED
    assert list(args["instruments"]) == ["SH600000", "SZ000001"]
    assert json.loads(json.dumps(args)) == args  # the task travels as JSON


def test_a_dict_of_spans_names_the_dataset_cache_qlib_names_for_the_same_dict():
    from qlib.data.cache import DiskDatasetCache

    args = parse({**FEATURE, "instruments": SPANS}).args
    assert dataset_uri(args) == DiskDatasetCache._uri(SPANS, FEATURE["fields"], None, None, "day", 1)


@pytest.mark.parametrize("instruments, says", [
    ({}, "instruments must list at least one code"),
    ({"../etc": [["2019-01-02", "2019-02-01"]]}, "is not a valid name"),
    ({"SH600000": "2019-01-02"}, "the spans of instrument SH600000 must be a list"),
    ({"SH600000": [["2019-01-02"]]}, "must be a (start, end) pair"),
    ({"SH600000": [["2019-01-02", "2019-02-01", "2019-03-01"]]}, "must be a (start, end) pair"),
    ({"SH600000": ["2019-01-02"]}, "must be a (start, end) pair"),
    ({"SH600000": [["2019-01-02", None]]}, "must give both its start and its end"),
    ({"SH600000": [["2019-01-02", "soon"]]}, "a span's end of SH600000 'soon' is not a date"),
    ({"SH600000": [["1066-10-14", "2019-02-01"]]}, "outside 1900..2200"),
    ({"SH600000": [[42, "2019-02-01"]]}, "must be a date or a date string, not int"),
    ({"SH600000": [["2019-03-01", "2019-02-01"]]}, "starts (2019-03-01 00:00:00) after it ends (2019-02-01 00:00:00)"),
    ({"SH600000": [["2019-01-02", "2019-02-01"]] * 1001}, "at most 1000 (start, end) pairs"),
])
def test_spans_are_checked_as_dates_with_their_instrument_named(instruments, says):
    assert says in refused({**FEATURE, "instruments": instruments})


def test_a_dict_of_more_codes_than_max_instruments_is_refused_naming_the_setting():
    parser = make_parser(make_config(provider_uri="/tmp/x", max_instruments=2))
    spans = {f"SH60000{i}": [["2019-01-02", "2019-02-01"]] for i in range(3)}
    assert "got 3 (the server's max_instruments)" in refused({**FEATURE, "instruments": spans}, parser)
    assert parse({**FEATURE, "instruments": dict(list(spans.items())[:2])}, parser)


def test_an_instrument_with_no_spans_is_kept_as_qlib_keeps_it():
    args = parse({**FEATURE, "instruments": {"SH600000": [], "SZ000001": [["2019-01-02", "2019-02-01"]]}}).args
    assert args["instruments"]["SH600000"] == []


def test_equivalent_dicts_of_spans_share_a_key_and_other_spans_do_not():
    as_text = {code: [[str(s), str(e)] for s, e in spans] for code, spans in SPANS.items()}
    reordered = dict(reversed([(code, list(reversed(spans))) for code, spans in as_text.items()]))
    keys = {parse({**FEATURE, "instruments": body}, encoding=encoding).key
            for body in (SPANS, as_text, reordered) for encoding in ("pickle", "json", "dict")}
    assert len(keys) == 1
    moved = {**as_text, "SH600000": [["2019-01-03", "2019-12-31"]]}
    market = {"market": "csi300", "filter_pipe": []}
    assert len(keys | {parse({**FEATURE, "instruments": other}).key for other in (moved, market, ["SH600000"])}) == 4


# --- inst_processors: the allow-list --------------------------------------------------------------

def test_qlibs_own_list_is_every_inst_processor_pyqlib_ships():
    import qlib

    found = set()
    for path in Path(qlib.__file__).parent.rglob("*.py"):
        for name in re.findall(r"^class (\w+)\(\s*InstProcessor\s*\)", path.read_text(errors="replace"), re.M):
            module = ".".join(path.relative_to(Path(qlib.__file__).parent.parent).with_suffix("").parts)
            found.add(f"{module}.{name}")
    assert found == set(inst_processors.QLIB_INST_PROCESSORS)


@pytest.mark.parametrize("encoding", ["pickle", "json", "dict"])
def test_qlibs_own_inst_processor_is_accepted_as_a_config_in_each_encoding(encoding):
    args = parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": [CONFIG]}, encoding=encoding).args
    assert args["inst_processors"] == [{"class": TIME_RANGE, "kwargs": CONFIG["kwargs"]}]
    dotted = {"class": TIME_RANGE, "kwargs": CONFIG["kwargs"]}
    assert parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": [dotted]}).key == parse(
        {**FEATURE, "instruments": ["SH600000"], "inst_processors": [CONFIG]}, encoding=encoding).key


def test_dates_in_a_processors_values_travel_as_tagged_timestamps():
    stamp = {"__timestamp__": "2019-02-01 00:00:00"}
    pickled = {**CONFIG, "kwargs": {"start_time": pd.Timestamp("2019-02-01"), "end_time": dt.date(2019, 11, 29)}}
    args = parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": [pickled]}, encoding="pickle").args
    assert args["inst_processors"][0]["kwargs"] == {"start_time": stamp,
                                                    "end_time": {"__timestamp__": "2019-11-29 00:00:00"}}
    state = {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
             "state": {"start_time": {"__timestamp__": "2019-02-01"}, "end_time": None}}
    args = parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": [state]}, encoding="json").args
    assert args["inst_processors"] == [{"class": TIME_RANGE, "state": {"start_time": stamp, "end_time": None}}]


@pytest.mark.parametrize("processor, says", [
    ({"class": "system", "module_path": "os", "kwargs": {"command": "id"}}, "'os.system' may not run on this server"),
    ({"class": "InstProcessor", "module_path": "qlib.data.inst_processor"}, "may not run on this server"),
    ({"class": "mypkg.processors.Demean"}, "'mypkg.processors.Demean' may not run on this server"),
    ({"class": "TimeRangeFlt", "module_path": "/tmp/evil.py"}, "is not a module.Class name"),
    ({"class": "TimeRangeFlt", "module_path": "file:///tmp/x.pkl"}, "is not a module.Class name"),
    ({"class": "TimeRangeFlt"}, "names no module_path"),
])
def test_an_inst_processor_the_server_does_not_allow_is_refused_naming_the_setting(processor, says):
    message = refused({**FEATURE, "instruments": ["SH600000"], "inst_processors": [processor]})
    assert says in message
    if "may not run" in says:
        assert message.endswith("those listed in the server's inst_processors_allowed")


def test_an_inst_processor_listed_in_inst_processors_allowed_is_accepted_beside_qlibs_own():
    parser = make_parser(make_config(provider_uri="/tmp/x", inst_processors_allowed=["mypkg.processors.Demean"]))
    body = {**FEATURE, "instruments": ["SH600000"],
            "inst_processors": [{"class": "Demean", "module_path": "mypkg.processors", "kwargs": {"fields": ["a"]}},
                                CONFIG]}
    assert [p["class"] for p in parse(body, parser).args["inst_processors"]] == ["mypkg.processors.Demean", TIME_RANGE]
    assert "may not run" in refused(body)  # not on a server without it


@pytest.mark.parametrize("names", [["Demean"], ["mypkg/processors.Demean"], ["mypkg.processors.Demean()"],
                                   ["mypkg..Demean"], [42]])
def test_an_inst_processors_allowed_entry_that_is_not_a_module_class_name_stops_the_server(names):
    with pytest.raises(ConfigError, match="inst_processors_allowed"):
        make_config(provider_uri="/tmp/x", inst_processors_allowed=names)


@pytest.mark.parametrize("value, says", [
    ("TimeRangeFlt", "inst_processors must be a list of at most 16"),
    ([CONFIG] * 17, "inst_processors must be a list of at most 16"),
    (["TimeRangeFlt"], "an inst_processor must be a config"),
    ([{"func": "TimeRangeFlt"}], "an inst_processor must be a config"),
    ([{**CONFIG, "extra": 1}], "unknown keys in an inst_processor: ['extra']"),
    ([{**CONFIG, "state": {}}], "kwargs (a config) or state (an instance), not both"),
    ([{**CONFIG, "kwargs": [1, 2]}], "must be a mapping of names to values"),
    ([{**CONFIG, "kwargs": {"start_time": {"__timestamp__": "someday"}}}], "'someday' is not a date"),
    ([{**CONFIG, "kwargs": {"start_time": {"__timestamp__": "2019-01-02T00:00:00+08:00"}}}], "not a naive date"),
    ([{**CONFIG, "kwargs": {"a": [[[[[[[[[[1]]]]]]]]]]}}], "nested deeper than 8"),
    ([{**CONFIG, "kwargs": {"a": {1: 2}}}], "keys must be strings"),
])
def test_malformed_inst_processors_are_refused(value, says):
    assert says in refused({**FEATURE, "instruments": ["SH600000"], "inst_processors": value})


def test_a_value_a_pickle_may_hold_but_json_cannot_is_refused():
    body = {**FEATURE, "instruments": ["SH600000"], "inst_processors": [{**CONFIG, "kwargs": {"a": {1, 2}}}]}
    with pytest.raises(RequestError, match="a value may not be a set"):
        parse(body, encoding="pickle")


def test_no_inst_processors_leaves_the_request_as_it_was():
    for value in (None, [], ()):
        args = parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": value}).args
        assert "inst_processors" not in args
    assert parse({**FEATURE, "instruments": ["SH600000"], "inst_processors": []}).key == \
        parse({**FEATURE, "instruments": ["SH600000"]}).key


# --- inst_processors: keys and cache names --------------------------------------------------------

def variants() -> dict:
    """Feature bodies with processors that differ in one thing each, or in nothing but their form."""
    base = {**FEATURE, "instruments": {"market": "csi300", "filter_pipe": []}, "inst_processors": [CONFIG]}
    return {
        "base": base,
        "same, fields reordered and respaced": {**base, "fields": ["Max( $close, 5 )", "$close"]},
        "same, dotted class": {**base, "inst_processors": [{"class": TIME_RANGE, "kwargs": CONFIG["kwargs"]}]},
        "other start": {**base, "start_time": "2019-02-01"},
        "other end": {**base, "end_time": None},
        "other kwargs": {**base, "inst_processors": [{**CONFIG, "kwargs": {"start_time": "2019-03-01"}}]},
        "as a state": {**base, "inst_processors": [{**{k: CONFIG[k] for k in ("class", "module_path")},
                                                    "state": CONFIG["kwargs"]}]},
        "twice": {**base, "inst_processors": [CONFIG, CONFIG]},
        "none": {**base, "inst_processors": []},
        "none, other start": {**base, "inst_processors": [], "start_time": "2019-02-01"},
    }


def test_the_key_and_the_cache_name_of_a_request_with_inst_processors_tell_the_same_requests_apart():
    """Requests share a task (the key) exactly when they share a dataset cache (the transfer's name of it);
    with processors both depend on the window, which the processors see."""
    requests = {name: parse(body) for name, body in variants().items()}
    keys = {name: request.key for name, request in requests.items()}
    uris = {name: dataset_uri(request.args) for name, request in requests.items()}
    for a in requests:
        for b in requests:
            assert (keys[a] == keys[b]) == (uris[a] == uris[b]), (a, b)
    same = {"base", "same, fields reordered and respaced", "same, dotted class"}
    assert {name for name in requests if keys[name] == keys["base"]} == same
    assert len(set(keys.values())) == len(requests) - 3  # "none, other start" shares the "none" cache too
    assert keys["none"] == keys["none, other start"]


def test_a_window_of_its_own_is_cached_only_with_inst_processors_or_a_field_that_depends_on_the_start():
    from qlib.data.cache import DiskDatasetCache

    plain = parse({**FEATURE, "instruments": ["SH600000"]}).args
    assert dataset_uri(plain) == DiskDatasetCache._uri(["SH600000"], FEATURE["fields"], None, None, "day", 1)
    averaged = parse({**FEATURE, "instruments": ["SH600000"], "fields": ["$close", "Mean($close, 5)"]}).args
    assert dataset_uri(averaged) != DiskDatasetCache._uri(["SH600000"], averaged["fields"], None, None, "day", 1)
    assert dataset_uri({**averaged, "end_time": None}) == dataset_uri(averaged)  # from its start to the data's end


# --- building them in a worker --------------------------------------------------------------------

DEMEAN = '''
from qlib.data.inst_processor import InstProcessor


class Demean(InstProcessor):
    def __init__(self, fields, since=None):
        self.fields, self.since = fields, since

    def __call__(self, df, instrument, *args, **kwargs):
        df[self.fields] = df[self.fields] - df[self.fields].mean()
        return df


class NotAProcessor:
    pass
'''


@pytest.fixture
def processors_module(tmp_path, monkeypatch):
    (tmp_path / "qs_test_processors.py").write_text(DEMEAN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "qs_test_processors"


def test_a_config_builds_the_processor_with_its_kwargs_and_dates_as_timestamps(processors_module):
    spec = inst_processors.check([{"class": f"{processors_module}.Demean",
                                   "kwargs": {"fields": ["$close"], "since": {"__timestamp__": "2019-01-02"}}}],
                                 inst_processors.allowed([f"{processors_module}.Demean"]))
    [built] = inst_processors.build(spec)
    assert type(built).__name__ == "Demean" and built.fields == ["$close"]
    assert built.since == pd.Timestamp("2019-01-02") and isinstance(built.since, pd.Timestamp)


def test_a_state_builds_the_instance_without_calling_its_init_as_unpickling_does():
    [built] = inst_processors.build([{"class": TIME_RANGE, "state": {"start_time": {"__timestamp__": "2019-02-01"},
                                                                     "end_time": None}}])
    assert type(built).__name__ == "TimeRangeFlt"  # whose __init__ would read the calendar
    assert vars(built) == {"start_time": pd.Timestamp("2019-02-01"), "end_time": None}


def test_an_allowed_name_that_is_no_inst_processor_or_no_module_is_refused(processors_module):
    with pytest.raises(RequestError, match="is not a subclass of Qlib's InstProcessor"):
        inst_processors.build([{"class": f"{processors_module}.NotAProcessor", "kwargs": {}}])
    with pytest.raises(RequestError, match="is not a subclass of Qlib's InstProcessor"):
        inst_processors.build([{"class": f"{processors_module}.Missing", "kwargs": {}}])
    with pytest.raises(ComputeError, match="cannot be imported on this server .* check inst_processors_allowed"):
        inst_processors.build([{"class": "qs_no_such_module.Demean", "kwargs": {}}])
    with pytest.raises(RequestError, match="unexpected keyword argument 'colour'"):
        inst_processors.build([{"class": f"{processors_module}.Demean", "kwargs": {"colour": 1}}])


# --- what qlib_server.client sends ----------------------------------------------------------------

def test_the_client_sends_an_instance_as_its_class_and_attributes_which_build_an_equal_one():
    from qlib.data.dataset.processor import TimeRangeFlt

    from qlib_server.client.providers import wire_processor

    instance = TimeRangeFlt.__new__(TimeRangeFlt)
    instance.__dict__.update(start_time=pd.Timestamp("2019-02-01"), end_time=None, extra=(np.int64(3), "x"))
    wire = wire_processor(instance)
    assert wire == {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
                    "state": {"start_time": {"__timestamp__": "2019-02-01 00:00:00"}, "end_time": None,
                              "extra": [3, "x"]}}
    [built] = inst_processors.build(inst_processors.check(json.loads(json.dumps([wire])), inst_processors.allowed()))
    assert vars(built) == {"start_time": pd.Timestamp("2019-02-01"), "end_time": None, "extra": [3, "x"]}


def test_the_client_sends_a_config_with_dates_tagged_and_a_class_object_by_name():
    from qlib.data.dataset.processor import TimeRangeFlt

    from qlib_server.client.providers import wire_processor


    config = {"class": TimeRangeFlt, "kwargs": {"start_time": pd.Timestamp("2019-02-01"), "freq": "day",
                                                "end_time": np.datetime64("2019-03-01T09:31:00")}}
    assert wire_processor(config) == {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
                                      "kwargs": {"start_time": {"__timestamp__": "2019-02-01 00:00:00"},
                                                 "freq": "day", "end_time": {"__timestamp__": "2019-03-01 09:31:00"}}}
    with pytest.raises(ValueError, match="holds object, which cannot be sent"):
        wire_processor({**CONFIG, "kwargs": {"how": object()}})
    with pytest.raises(ValueError, match="must be an InstProcessor or a config"):
        wire_processor("qlib.data.dataset.processor.TimeRangeFlt")
