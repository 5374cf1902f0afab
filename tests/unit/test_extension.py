"""A dataset cache extended by appended days equals the cache computed again in full on the new data, row for row
and bit for bit; anything but an append is left to a full computation; the extended cache reads as one table."""

import numpy as np
import pytest
import qlib

from qlib_server.datagen import generate_dataset
from qlib_server.datagen_updates import append_days, change_factor, list_instrument, rewrite_value
from qlib_server.state import records
from qlib_server.state.sources import RECORDS, is_current
from qlib_server.worker import datacache, extension, storage

MARKET = {"market": "csi300", "filter_pipe": []}
FIELDS = ["$close", "Mean($close, 5)", "Std($close, 20)/$close", "Corr($close, Log($volume+1), 10)",
          "EMA($close, 12)", "Slope($close, 10)", "Rank($close, 30)", "Max($high, 0)",
          "Ref($close, -2)/Ref($close, -1) - 1"]  # a label: its last old rows change when days are appended


@pytest.fixture
def data(tmp_path):
    root = generate_dataset(tmp_path / "data", instruments=10, days=160, markets={"csi300": 8})
    (root / "dataset_cache").mkdir()
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR", kernels=1,
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    return root


def compute(root, name):
    from qlib.data.data import DatasetD

    path = root / "dataset_cache" / name
    datacache.compute_cache(path, DatasetD._provider, MARKET, FIELDS, "day", hdf5=False)
    return path


def extend(path) -> bool:
    from qlib.data.cache import H

    H.clear()  # the worker's calendar, as a new data generation clears it
    return extension.try_extend(path, MARKET, FIELDS, "day")


def assert_same_records(path, other):
    ours, theirs = records.read(path), records.read(other)
    assert ours.columns == theirs.columns and ours.codes == theirs.codes
    assert np.array_equal(ours.days, theirs.days)
    for a, b in zip(ours.take(), theirs.take()):
        assert a.dtype == b.dtype and np.array_equal(a.T.view(np.uint8), b.T.view(np.uint8))  # bit for bit, NaN too
    assert ours.counts.tolist() == theirs.counts.tolist()


@pytest.mark.parametrize("steps", [[1], [5, 1]], ids=["one day", "five days then one"])
def test_a_cache_extended_by_appended_days_equals_the_cache_computed_again(data, steps):
    path = compute(data, "c")
    for n, step in enumerate(steps):
        append_days(data, step, seed=10 + n)
        assert not is_current(path, form=RECORDS)
        assert extend(path)
        assert is_current(path, form=RECORDS)
        assert len(records.read(path).segments) == 2 + n  # the rows already written are not copied
        assert_same_records(path, compute(data, f"full{n}"))


def test_an_extended_cache_gets_qlibs_hdf5_form_from_its_records_only_when_asked(data):
    path = compute(data, "c")
    append_days(data, 2)
    assert extend(path)
    assert not path.exists() and not is_current(path)  # Qlib's file of the old rows is gone, not served


@pytest.mark.parametrize("change", [
    lambda root: rewrite_value(root, "SZ000001", "close", 100, 1.5),
    lambda root: change_factor(root, "SH600002", 100, 0.5),
    lambda root: list_instrument(root, "csi300", "SH600999", first_day=50),
], ids=["a past value rewritten", "a factor changed", "an instrument listed"])
def test_anything_but_an_append_is_computed_again(data, change):
    path = compute(data, "c")
    append_days(data, 1)
    change(data)
    assert not extend(path) and not is_current(path, form=RECORDS)


def test_a_cache_extended_more_times_than_its_segments_allow_is_written_again_as_one(data, monkeypatch):
    monkeypatch.setattr(extension, "MAX_SEGMENTS", 3)
    path = compute(data, "c")
    for n in range(4):
        append_days(data, 1, seed=20 + n)
        assert extend(path)
    assert len(records.read(path).segments) <= 3
    assert_same_records(path, compute(data, "full"))


@pytest.mark.parametrize("part_values", [extension.PART_VALUES, 5000], ids=["parts of 64 MB", "parts of 20 kB"])
def test_an_extended_cache_written_again_as_one_segment_equals_a_full_computation(data, monkeypatch, part_values):
    """A refresh, once the caches it extends are current, writes each again as one segment (its rows copied in
    parts of a bounded size), so that a client on the host maps it whole as a view of one file."""
    monkeypatch.setattr(extension, "PART_VALUES", part_values)
    path = compute(data, "c")
    assert not extension.compact(path)  # one segment already
    for n in range(2):
        append_days(data, 1 + n, seed=30 + n)
        assert extend(path) and len(records.read(path).segments) == 2
        assert extension.compact(path)
        assert is_current(path, form=RECORDS) and len(records.read(path).segments) == 1
        assert sorted(p.name for p in records.segment_files(path)) == records.read(path).files  # no file left over
    assert_same_records(path, compute(data, "full"))


def test_a_checkpoint_newer_than_the_record_of_the_sources_is_computed_again(data):
    """A worker killed after it saved the new checkpoint and manifest, before it wrote the new record: the
    cache is neither served (its record does not match the data) nor extended again from the wrong state."""
    from qlib_server.state.sources import digests_path, sources_path

    path = compute(data, "c")
    append_days(data, 1)
    record, digests = sources_path(path).read_bytes(), digests_path(path).read_bytes()
    assert extend(path)
    sources_path(path).write_bytes(record)  # the record of before the extension, with the new checkpoint
    digests_path(path).write_bytes(digests)
    assert not is_current(path, form=RECORDS)
    assert not extend(path)


def test_a_refresh_leaves_telling_a_rewrite_apart_to_the_extension_of_a_cache_used_lately(data):
    """A cache about to be extended (used lately) is not told apart twice: the refresh only checks it has what
    an extension needs, and the extension finds the rewrite; any other stale cache is told apart and dropped."""
    import fakeredis

    lately, other = compute(data, "lately"), compute(data, "other")
    append_days(data, 1)
    rewrite_value(data, "SZ000001", "close", 100, 3.0)
    counts = datacache.drop_stale(data / "dataset_cache", fakeredis.FakeRedis(), frozenset({"lately"}))
    assert counts["to_extend"] == [lately] and counts["dropped"] == 1 and not records.path_of(other).exists()
    assert not extend(lately)  # the rewrite found: computed again, not extended


def test_a_cache_holds_its_columns_in_the_computing_requests_order_and_is_extended_only_in_that_order(data):
    """The engine writes the records' columns in the order of the request that computed the cache (a client of
    that order maps them as they are); an extension writes its rows in the checkpoint's order, so a checkpoint
    of another order than the records' is not extended from but computed again."""
    from dataclasses import replace

    from qlib_server.engine.checkpoint import Checkpoint

    path = compute(data, "c")
    assert records.read(path).columns == [f.replace(" ", "") for f in FIELDS]
    saved = Checkpoint.load(extension.checkpoint_path(path))
    extension.save_checkpoint(path, replace(saved, names=sorted(saved.names)))
    append_days(data, 1)
    assert not extend(path) and not is_current(path, form=RECORDS)
