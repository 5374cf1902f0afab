"""Data updates: the stamp that notices new days, the daily schedule, and extend_dataset itself."""

import datetime as dt
import threading

import numpy as np
import pytest

from qlib_server.config import make_config
from qlib_server.datagen import FIELDS, extend_dataset, generate_dataset
from qlib_server.worker.updater import DataWatcher, data_stamp


@pytest.fixture
def data(tmp_path):
    return generate_dataset(tmp_path / "data", instruments=6, days=60)


def test_the_data_stamp_changes_when_days_are_appended(data):
    before = data_stamp(str(data))
    extend_dataset(data, 3)
    assert data_stamp(str(data)) != before


def test_the_data_stamp_is_stable_when_nothing_changes(data):
    assert data_stamp(str(data)) == data_stamp(str(data))


def test_extending_a_dataset_appends_days_and_keeps_history(data):
    calendar = (data / "calendars" / "day.txt").read_text().split()
    close_before = np.fromfile(data / "features" / "sz000001" / "close.day.bin", dtype="<f4")
    extend_dataset(data, 4)
    calendar_after = (data / "calendars" / "day.txt").read_text().split()
    close_after = np.fromfile(data / "features" / "sz000001" / "close.day.bin", dtype="<f4")
    assert calendar_after[: len(calendar)] == calendar and len(calendar_after) == len(calendar) + 4
    assert np.array_equal(close_after[: len(close_before)], close_before)
    assert len(close_after) == len(close_before) + 4
    for field in FIELDS:
        assert len(np.fromfile(data / "features" / "sz000001" / f"{field}.day.bin", dtype="<f4")) == len(close_after)
    spans = dict(line.split("\t", 1) for line in (data / "instruments" / "all.txt").read_text().splitlines())
    assert spans["SZ000001"].endswith(calendar_after[-1])


def test_the_daily_update_is_due_only_with_auto_update_after_update_time(data):
    stop = threading.Event()
    on = DataWatcher(make_config(provider_uri=str(data), auto_update=True, update_time="23:45"), lambda: None, stop)
    off = DataWatcher(make_config(provider_uri=str(data), auto_update=False, update_time="23:45"), lambda: None, stop)
    tomorrow = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(23, 50))
    early = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(23, 40))
    assert on.due_daily(tomorrow) and not on.due_daily(early)
    assert not off.due_daily(tomorrow)


def test_the_watcher_calls_back_when_the_data_changes(data):
    stop, changed = threading.Event(), threading.Event()
    watcher = DataWatcher(make_config(provider_uri=str(data), data_check_interval=0.05), changed.set, stop)
    watcher.start()
    try:
        extend_dataset(data, 2)
        assert changed.wait(10)
    finally:
        stop.set()
        watcher.join(5)
