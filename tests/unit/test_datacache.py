"""Dataset caches valid only for the data they were computed from: the record of their sources, what
makes one current, the empty cache, and the refresh that drops stale ones."""

import json
import os
import threading

import fakeredis
import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import redis_lock
from qlib.data.cache import DiskDatasetCache

from qlib_server.config import make_config
from qlib_server.datagen import extend_dataset, generate_dataset
from qlib_server.state import keys, records, sources
from qlib_server.state.sources import is_current, write_sources
from qlib_server.worker import datacache
from qlib_server.worker.datacache import cache_sources, clear, references, write_empty
from qlib_server.worker.updater import data_digest, data_stamp, refresh

FIELDS = ["$close", "Mean($volume, 5)"]


@pytest.fixture
def data(tmp_path):
    root = generate_dataset(tmp_path / "data", instruments=6, days=60)
    (root / "dataset_cache").mkdir()
    return root


def make_cache(root, uri, instruments, fields=FIELDS):
    """A complete cache (of no rows: the record is what matters here) with the record of its sources."""
    path = root / "dataset_cache" / uri
    sources = cache_sources(root, instruments, fields, "day")
    write_empty(path, instruments, fields, "day", "2018-03-23")
    write_no_records(path, fields)
    write_sources(path, sources)
    return path


def write_no_records(path, fields):
    """The records form of a cache of no rows (the form ``qlib_server.client`` streams)."""
    segment = records.segment_path(path)
    records.Writer(segment, sorted({f.replace(" ", "") for f in fields}), [], "ns", 0).close()
    records.publish(path, [(segment, 0)])


def touch_later(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_expressions_name_their_raw_fields_pit_fields_and_literal_instruments():
    raw, pit, literals = references(["Mean($close, 5)/$VWAP", "P($$roewa_q)", "Feature('open') + PFeature(\"eps_a\")",
                                     "ChangeInstrument('SH600000', $high)", "Rolling($low, 5, 'mean')"])
    assert raw == {"close", "vwap", "open", "high", "low"}
    assert pit == {"roewa_q", "eps_a"}
    assert literals == {"SH600000", "mean"}


def test_a_market_cache_depends_on_the_calendar_the_market_file_and_each_listed_instruments_fields(data):
    market = {"market": "csi300", "filter_pipe": [{"filter_type": "ExpressionDFilter", "rule_expression": "$open>1"}]}
    sources = cache_sources(data, market, ["$close"], "day")
    codes = {line.split("\t")[0] for line in (data / "instruments" / "csi300.txt").read_text().splitlines()}
    assert list(sources)[:2] == ["calendars/day.txt", "instruments/csi300.txt"]
    assert set(list(sources)[2:]) == {f"features/{c.lower()}/{f}.day.bin" for c in codes for f in ("close", "open")}
    assert sources["calendars/day.txt"] == [os.stat(data / "calendars/day.txt").st_size,
                                            os.stat(data / "calendars/day.txt").st_mtime_ns]


def test_a_missing_file_is_recorded_as_missing(data):
    sources = cache_sources(data, ["SH600000", "SH999999"], ["$close", "$nothing"], "day")
    assert sources["features/sh999999/close.day.bin"] is None and sources["features/sh600000/nothing.day.bin"] is None
    assert sources["features/sh600000/close.day.bin"] is not None


def test_a_cache_is_current_until_a_file_it_was_computed_from_changes(data):
    path = make_cache(data, "a", ["SH600000", "SZ000001"])
    other = make_cache(data, "b", ["SZ000003"])
    assert is_current(path) and is_current(other)
    touch_later(data / "features" / "sz000001" / "close.day.bin")
    assert not is_current(path) and is_current(other)


def test_a_cache_is_stale_once_a_file_that_was_missing_appears(data):
    path = make_cache(data, "a", ["SH600000"], ["$close", "$dividend"])
    assert is_current(path)
    (data / "features" / "sh600000" / "dividend.day.bin").write_bytes(np.array([0, 1.5], "<f4").tobytes())
    assert not is_current(path)


def test_a_cache_is_stale_once_a_file_it_read_is_removed_or_the_calendar_grows(data):
    removed, extended = make_cache(data, "a", ["SH600000"]), make_cache(data, "b", ["SZ000003"])
    (data / "features" / "sh600000" / "volume.day.bin").unlink()
    assert not is_current(removed)
    extend_dataset(data, 2)
    assert not is_current(extended)


def test_a_cache_without_its_record_or_with_a_half_written_one_is_not_current(data):
    path = make_cache(data, "a", ["SH600000"])
    record = path.with_suffix(sources.SOURCES)
    text = record.read_text()
    record.unlink()
    assert not is_current(path)
    record.with_name(record.name + ".tmp").write_text(text)  # the rename that completes it never happened
    assert not is_current(path)
    record.write_text(text[: len(text) // 2])
    assert not is_current(path)


def test_a_cache_missing_one_of_qlibs_files_is_not_current(data):
    path = make_cache(data, "a", ["SH600000"])
    path.with_suffix(".index").unlink()
    assert not is_current(path)


def test_the_record_is_json_naming_paths_relative_to_the_data_directory(data):
    path = make_cache(data, "a", ["SH600000"])
    files = json.loads(path.with_suffix(".sources").read_text())["files"]
    assert "features/sh600000/close.day.bin" in files and not any(name.startswith("/") for name in files)
    assert not path.with_name("a.sources.tmp").exists()


def test_clearing_a_cache_removes_every_file_of_it_and_leftovers_of_an_interrupted_write(data):
    path = make_cache(data, "a", ["SH600000"])
    path.with_suffix(".data").write_bytes(b"half an HDF5 file")
    path.with_name("a.sources.tmp").write_text("{")
    clear(path)
    assert list((data / "dataset_cache").iterdir()) == []


@pytest.mark.parametrize("window", [(None, None), ("2018-01-02", "2018-02-01"), ("2010-01-01", "2010-12-31")])
def test_an_empty_cache_reads_as_the_empty_frame_local_qlib_gives(data, window):
    fields = ["$close", "Mean($close, 5)", "$close/Ref($close, 1)"]
    path = make_cache(data, "empty", ["SH999999"], fields)
    got = DiskDatasetCache.read_data_from_cache(path, *window, fields)
    want = pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=("instrument", "datetime")),
                        columns=fields, dtype=np.float32)  # what Qlib's dataset_processor returns for no data
    pdt.assert_frame_equal(got, want)


def test_the_data_stamp_changes_when_a_feature_file_changes_or_goes(data):
    before = data_stamp(str(data))
    touch_later(data / "features" / "sh600000" / "close.day.bin")
    touched = data_stamp(str(data))
    (data / "features" / "sz000001" / "open.day.bin").unlink()
    assert len({before, touched, data_stamp(str(data))}) == 3


def test_the_caches_do_not_count_in_the_data_stamp(data):
    before = data_stamp(str(data))
    make_cache(data, "a", ["SH600000"])
    assert data_stamp(str(data)) == before


def test_a_refresh_drops_stale_caches_and_bumps_the_generation_only_when_the_data_changed(data):
    client = fakeredis.FakeRedis()
    cfg = make_config(provider_uri=str(data))
    kept, stale = make_cache(data, "kept", ["SZ000003"]), make_cache(data, "stale", ["SH600000"])
    unfinished = make_cache(data, "unfinished", ["SZ000005"])
    unfinished.with_suffix(".sources").unlink()
    assert refresh(cfg, client, force=False) == {"kept": 2, "dropped": 1, "generation": 1}  # first look
    assert client.get(keys.DATA_DIGEST).decode() == data_digest(str(data))
    (data / "features_cache").mkdir()
    assert refresh(cfg, client, force=False) == {"kept": 2, "dropped": 0}
    assert (data / "features_cache").is_dir()

    touch_later(data / "features" / "sh600000" / "close.day.bin")
    assert refresh(cfg, client, force=False) == {"kept": 1, "dropped": 1, "generation": 2}
    assert is_current(kept) and not stale.exists() and not unfinished.exists()
    assert not (data / "features_cache").exists()
    assert refresh(cfg, client)["generation"] == 3  # forced: qlib-server refresh, the daily update


def test_a_refresh_waits_for_the_worker_writing_a_cache_and_keeps_it_once_complete(data):
    client = fakeredis.FakeRedis()
    path = data.resolve() / "dataset_cache" / "busy"
    sources = cache_sources(data, ["SH600000"], FIELDS, "day")
    write_empty(path, ["SH600000"], FIELDS, "day", "2018-03-23")  # written, its record not yet
    write_no_records(path, FIELDS)
    held = redis_lock.Lock(client, keys.QLIB_CACHE_LOCK + datacache.lock_name(path), expire=5, auto_renewal=True)
    held.acquire()
    finished = threading.Timer(0.5, lambda: (write_sources(path, sources), held.release()))
    finished.start()
    counts = datacache.drop_stale(path.parent, client)
    finished.join()
    assert counts == {"kept": 1, "dropped": 0, "to_extend": []} and is_current(path)


def test_a_cache_whose_records_are_of_an_earlier_layout_is_not_current_and_a_refresh_drops_it(data):
    """After an upgrade that changed the records' layout (rows to columns), the caches on disk would read as other
    values: they are not current, the processor's first refresh drops them, and they are computed again."""
    client = fakeredis.FakeRedis()
    cfg = make_config(provider_uri=str(data))
    kept, old = make_cache(data, "kept", ["SZ000003"]), make_cache(data, "old", ["SH600000"])
    manifest = json.loads(records.path_of(old).read_text())
    records.path_of(old).write_text(json.dumps({"segments": manifest["segments"]}))  # as versions before wrote it
    assert is_current(kept, form=sources.RECORDS) and not is_current(old, form=sources.RECORDS)
    assert refresh(cfg, client, force=False) == {"kept": 1, "dropped": 1, "generation": 1}
    assert not old.exists() and not records.path_of(old).exists() and is_current(kept, form=sources.RECORDS)
