"""A feature task with a dict of instruments and spans, or with ``inst_processors``, as a worker computes it
(``compute.feature``, Qlib initialised in this process, Redis faked): its dataset cache is written under the
name the transfer reads (``transfer.dataset_uri`` of the same arguments), in the records form a
``qlib_server.client`` request asks for, and holds the frame local Qlib gives for the request."""

import fakeredis
import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import qlib

from qlib_server.config import make_config
from qlib_server.datagen import generate_dataset
from qlib_server.errors import ComputeError
from qlib_server.front.handler import make_parser
from qlib_server.front.transfer import dataset_uri
from qlib_server.state import records
from qlib_server.state.sources import HDF5, RECORDS, is_current
from qlib_server.worker import compute, datacache, dataset, storage

FIELDS = ["$close", "Mean($close, 5)", "Ref($volume, 1) / $volume"]
START, END = "2018-02-01", "2018-05-31"
TIME_RANGE = {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
              "kwargs": {"start_time": "2018-02-05", "end_time": "2018-05-25"}}
WITHIN_SPANS = {**TIME_RANGE, "kwargs": {"start_time": "2018-02-20", "end_time": "2018-04-25"}}  # of spans()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("window") / "data", instruments=12, days=120)
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR", kernels=1,
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    return root


@pytest.fixture
def worker(data, monkeypatch):
    """This process's ``DatasetD`` as a worker's: the server's dataset cache over Qlib's provider."""
    from qlib.data.cache import CacheUtils
    from qlib.data.data import DatasetD

    local = DatasetD._provider
    cache = datacache.ServerDatasetCache(local)
    cache.r = fakeredis.FakeRedis()
    monkeypatch.setattr(CacheUtils, "writer_lock", staticmethod(datacache.cache_lock))
    monkeypatch.setattr(DatasetD, "_provider", cache)
    return local


def request_args(body: dict, allowed: tuple = ()) -> dict:
    payload = {"head": {"version": "0.9.7"}, "body": {"fields": FIELDS, "start_time": START, "end_time": END,
                                                      "freq": "day", "disk_cache": 1, "stream": True, **body}}
    config = make_config(provider_uri="/tmp/x", inst_processors_allowed=list(allowed))
    return make_parser(config).parse("feature", payload).args


def cached_frame(path) -> pd.DataFrame:
    """The records file as Qlib's frame: by instrument, then date; the requested columns."""
    table = records.read(path)
    datetime, instrument, values = table.take()
    codes = np.array(table.codes, dtype=object)[instrument]
    index = pd.MultiIndex.from_arrays([codes, pd.DatetimeIndex(datetime)], names=["instrument", "datetime"])
    frame = pd.DataFrame(values, index=index, columns=table.columns).sort_index()
    return frame[[f.replace(" ", "") for f in FIELDS]].set_axis(FIELDS, axis=1)


def spans():
    from qlib.data import D

    return D.list_instruments(D.instruments("csi300"), "2018-02-15", "2018-04-30")


CASES = {
    "spans": lambda: ({"instruments": spans()}, {"instruments": spans()}),
    "inst_processors": lambda: ({"instruments": {"market": "all"}, "inst_processors": [TIME_RANGE]},
                                {"instruments": {"market": "all", "filter_pipe": []}, "inst_processors": [TIME_RANGE]}),
    "both": lambda: ({"instruments": spans(), "inst_processors": [WITHIN_SPANS]},
                     {"instruments": spans(), "inst_processors": [WITHIN_SPANS]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_worker_writes_the_cache_the_transfer_names_holding_local_qlibs_frame(worker, data, case):
    body, local_args = CASES[case]()
    args = request_args(body)
    uri = compute.feature(args, expression_cache=False)
    path = data / "dataset_cache" / uri
    assert uri == dataset_uri(args)
    assert is_current(path, form=RECORDS) and not is_current(path, form=HDF5)  # a streaming client's request
    expected = worker.dataset(local_args["instruments"], FIELDS, START, END, "day",
                              inst_processors=local_args.get("inst_processors", []))
    assert len(expected) > 100
    got = cached_frame(path)
    if "inst_processors" in body:  # the window's frame itself: the transfer sends all of it
        pdt.assert_frame_equal(got, expected, check_exact=True)
        unfiltered = worker.dataset(local_args["instruments"], FIELDS, START, END, "day")
        kept, listed = (f.index.get_level_values(0).nunique() for f in (expected, unfiltered))
        assert kept < listed  # the processor acted
    else:  # the whole history: the transfer sends the window's rows
        pdt.assert_frame_equal(got.loc[pd.IndexSlice[:, START:END], :], expected, check_exact=True)


def test_inst_processors_see_the_window_so_another_window_is_another_cache(worker, data):
    first = request_args({"instruments": {"market": "all"}, "inst_processors": [TIME_RANGE]})
    later = request_args({"instruments": {"market": "all"}, "inst_processors": [TIME_RANGE],
                          "start_time": "2018-03-01"})
    assert compute.feature(first, False) != compute.feature(later, False)
    # TimeRangeFlt keeps an instrument whose data in the window starts by its start_time: a window starting
    # after it keeps none (Qlib's answer too), which a slice of the first window's cache would not give
    expected = worker.dataset({"market": "all", "filter_pipe": []}, FIELDS, "2018-03-01", END, "day",
                              inst_processors=[TIME_RANGE])
    assert expected.empty
    assert len(records.read(data / "dataset_cache" / dataset_uri(later))) == 0


def test_a_stock_clients_request_with_spans_gets_qlibs_hdf5_cache_too(worker, data):
    from qlib.data.cache import DiskDatasetCache

    args = request_args({"instruments": spans()})
    del args["stream"]
    path = data / "dataset_cache" / compute.feature(args, expression_cache=False)
    assert is_current(path, form=HDF5)
    ours = DiskDatasetCache.read_data_from_cache(path, START, END, FIELDS)
    pdt.assert_frame_equal(ours, worker.dataset(spans(), FIELDS, START, END, "day"), check_exact=True)


def test_a_dict_of_spans_records_the_files_of_its_codes_as_its_sources(data):
    sources = datacache.cache_sources(data, {"SH600000": [["2018-01-02 00:00:00", "2018-02-01 00:00:00"]]},
                                      ["$close"], "day")
    assert list(sources) == ["calendars/day.txt", "features/sh600000/close.day.bin"]


def test_inst_processors_leave_the_frame_to_qlib(worker):
    assert dataset.compute(worker, ["SH600000"], FIELDS, START, END, "day", inst_processors=[object()]) is None


FLOAT64 = """
from qlib.data.inst_processor import InstProcessor


class Rolled(InstProcessor):
    def __call__(self, df, instrument, *args, **kwargs):
        return df.rolling(3, min_periods=1).mean()  # pandas' rolling gives float64
"""


def test_a_processor_leaving_values_that_are_not_float32_is_an_error_not_a_rounded_answer(worker, tmp_path,
                                                                                          monkeypatch):
    (tmp_path / "qs_float64_processor.py").write_text(FLOAT64)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = request_args({"instruments": ["SH600000"], "inst_processors": [{"class": "qs_float64_processor.Rolled"}]},
                        allowed=("qs_float64_processor.Rolled",))
    with pytest.raises(ComputeError, match="^inst_processors left column '\\$close' as float64: the server serves"):
        compute.run("feature", args)


# -- a window from mid-calendar ---------------------------------------------------------------------

# fields whose values depend on where Qlib starts evaluating them: a seeded average, an expanding mean, a running
# variance, Delta (NaN on a window's first day), a running regression, a label
STARTING = ["EMA($close, 12)", "Mean($close, 0)", "Std($close, 20)/$close", "Delta($close, 3)", "Slope($close, 10)",
            "Ref($close, -2)/Ref($close, -1) - 1"]
PLAIN = ["$close", "Ref($volume, 1) / $volume", "Max($high, 10)", "Rank($close, 5)"]


def served_frame(path, fields, start, end) -> pd.DataFrame:
    """What the transfer sends of a records file for ``start``..``end``, as Qlib's frame."""
    table = records.read(path)
    datetime, instrument, values = table.take(start, end)
    codes = np.array(table.codes, dtype=object)[instrument]
    index = pd.MultiIndex.from_arrays([codes, pd.DatetimeIndex(datetime)], names=["instrument", "datetime"])
    frame = pd.DataFrame(values, index=index, columns=table.columns).sort_index()
    return frame[[f.replace(" ", "") for f in fields]].set_axis(fields, axis=1)


def test_a_window_from_mid_calendar_gets_local_qlibs_values_not_the_whole_historys_cut(worker, data):
    market = {"market": "csi300"}
    for end in (END, None):
        args = request_args({"instruments": market, "fields": STARTING, "end_time": end})
        path = data / "dataset_cache" / compute.feature(args, expression_cache=False)
        expected = worker.dataset({"market": "csi300", "filter_pipe": []}, STARTING, START, end, "day")
        assert served_frame(path, STARTING, START, end).equals(expected)
    whole = worker.dataset({"market": "csi300", "filter_pipe": []}, STARTING, None, None, "day")
    assert not whole.loc[expected.index].equals(expected)  # what a cache of the whole history would have given


def test_fields_whose_values_do_not_depend_on_the_start_share_the_whole_historys_cache(worker, data):
    market = {"market": "csi300"}
    first, later = (request_args({"instruments": market, "fields": PLAIN, "start_time": start})
                    for start in (START, "2018-03-01"))
    uri = compute.feature(first, expression_cache=False)
    assert compute.feature(later, expression_cache=False) == uri == dataset_uri(later)
    for start in (START, "2018-03-01"):
        expected = worker.dataset({"market": "csi300", "filter_pipe": []}, PLAIN, start, END, "day")
        assert served_frame(data / "dataset_cache" / uri, PLAIN, start, END).equals(expected)
    mixed = [request_args({"instruments": market, "fields": [*PLAIN, STARTING[0]], "start_time": start})
             for start in (START, "2018-03-01")]
    assert len({uri, *(dataset_uri(args) for args in mixed)}) == 3  # one field that depends on it: a cache per start
