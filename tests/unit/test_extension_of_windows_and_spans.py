"""Appended days and the caches of the new request forms: a cache of a dict of instruments and spans is
extended like a market's (equal, bit for bit, to the cache computed again); a cache of a request with
``inst_processors`` (its own window, computed by Qlib) is never extended: it is computed again."""

import fakeredis
import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import qlib
from test_extension import assert_same_records

from qlib_server.config import make_config
from qlib_server.datagen import generate_dataset
from qlib_server.datagen_updates import append_days
from qlib_server.front.handler import make_parser
from qlib_server.state import records
from qlib_server.state.sources import RECORDS, is_current
from qlib_server.worker import compute, datacache, extension, storage

FIELDS = ["$close", "Mean($close, 5)", "Std($close, 20)/$close", "EMA($close, 12)",
          "Ref($close, -2)/Ref($close, -1) - 1"]
# as a request carries them: one span ending before the last day, one after it (the appended days are in it)
SPANS = {"SH600000": [["2018-01-02 00:00:00", "2018-03-30 00:00:00"], ["2018-05-01 00:00:00", "2030-01-01 00:00:00"]],
         "SZ000001": [["2018-02-01 00:00:00", "2018-06-29 00:00:00"]],
         "SH600002": [["2018-01-02 00:00:00", "2030-01-01 00:00:00"]]}
TIME_RANGE = {"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor",
              "kwargs": {"start_time": "2018-02-05", "end_time": "2018-05-25"}}


@pytest.fixture
def data(tmp_path):
    root = generate_dataset(tmp_path / "data", instruments=10, days=160, markets={"csi300": 8})
    (root / "dataset_cache").mkdir()
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR", kernels=1,
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    return root


def compute_spans(root, name):
    from qlib.data.data import DatasetD

    path = root / "dataset_cache" / name
    datacache.compute_cache(path, DatasetD._provider, SPANS, FIELDS, "day", hdf5=False)
    return path


def test_a_cache_of_a_dict_of_spans_extended_by_appended_days_equals_the_cache_computed_again(data):
    from qlib.data.cache import H

    path = compute_spans(data, "c")
    append_days(data, 3)
    assert not is_current(path, form=RECORDS)
    H.clear()
    assert extension.try_extend(path, SPANS, FIELDS, "day")
    assert is_current(path, form=RECORDS) and len(records.read(path).segments) == 2
    assert_same_records(path, compute_spans(data, "full"))


def test_a_cache_with_inst_processors_is_computed_again_not_extended_when_days_are_appended(data, monkeypatch):
    from qlib.data.cache import CacheUtils, H
    from qlib.data.data import DatasetD

    local = DatasetD._provider
    cache = datacache.ServerDatasetCache(local)
    cache.r = fakeredis.FakeRedis()
    monkeypatch.setattr(CacheUtils, "writer_lock", staticmethod(datacache.cache_lock))
    monkeypatch.setattr(DatasetD, "_provider", cache)
    body = {"instruments": {"market": "all"}, "fields": FIELDS, "start_time": "2018-02-01", "end_time": "2018-05-31",
            "inst_processors": [TIME_RANGE], "stream": True}
    args = make_parser(make_config(provider_uri="/tmp/x")).parse("feature", {"head": {"version": "0.9.7"},
                                                                              "body": body}).args
    uri = compute.feature(args, expression_cache=False)
    assert not extension.checkpoint_path(data / "dataset_cache" / uri).exists()  # Qlib computed it
    append_days(data, 2)
    H.clear()
    monkeypatch.setattr(extension, "try_extend", lambda *a, **k: pytest.fail("a window's cache was extended"))
    assert compute.feature(args, expression_cache=False) == uri
    path = data / "dataset_cache" / uri
    assert is_current(path, form=RECORDS)
    table = records.read(path)
    datetime, instrument, values = table.take()
    index = pd.MultiIndex.from_arrays([np.array(table.codes, dtype=object)[instrument], pd.DatetimeIndex(datetime)],
                                      names=["instrument", "datetime"])
    ours = pd.DataFrame(values, index=index, columns=table.columns).sort_index()
    theirs = local.dataset({"market": "all", "filter_pipe": []}, FIELDS, "2018-02-01", "2018-05-31", "day",
                           inst_processors=[TIME_RANGE])
    pdt.assert_frame_equal(ours[[f.replace(" ", "") for f in FIELDS]].set_axis(FIELDS, axis=1), theirs,
                           check_exact=True)


def test_a_cache_of_a_start_mid_calendar_extended_by_appended_days_equals_the_cache_computed_again(data):
    from qlib.data.cache import H
    from qlib.data.data import DatasetD

    def computed(name):
        path = data / "dataset_cache" / name
        datacache.compute_cache(path, DatasetD._provider, {"market": "csi300", "filter_pipe": []}, FIELDS, "day",
                                hdf5=False, window=("2018-03-01 00:00:00", None))
        return path

    path = computed("c")
    assert records.read(path).days[0] == np.datetime64("2018-03-01")
    append_days(data, 2)
    H.clear()
    assert extension.extend_cache(path)  # as a refresh does: the request it recorded, its start included
    assert is_current(path, form=RECORDS) and len(records.read(path).segments) == 2
    assert_same_records(path, computed("full"))
