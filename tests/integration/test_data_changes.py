"""Answers follow the data on disk: a dataset cache is served only while the files it was computed from
are unchanged, whether they changed while no server ran or under a running one.

Each test changes its own copy of the session dataset."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
from clients import WireClient, local_qlib, run_pyqlib
from conftest import wait_until
from qlib.data.cache import DiskDatasetCache

from qlib_server.datagen import extend_dataset

pytestmark = pytest.mark.integration

FIELDS = ["$close", "$open", "Mean($close, 5)"]
BODY = {"instruments": {"market": "all", "filter_pipe": []}, "fields": FIELDS, "start_time": None, "end_time": None,
        "freq": "day", "disk_cache": 1}
LOCAL = f"result = D.features(D.instruments('all'), {FIELDS!r})"


@pytest.fixture
def data(dataset, tmp_path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "data", ignore=shutil.ignore_patterns("*_cache")))


def served(client: WireClient, root: Path) -> pd.DataFrame:
    answer = client.request("feature", BODY, timeout=120)
    assert answer["status"] == 0, answer
    return DiskDatasetCache.read_data_from_cache(root / "dataset_cache" / answer["result"], None, None, FIELDS)


def same(got: pd.DataFrame, want: pd.DataFrame) -> bool:
    try:
        pdt.assert_frame_equal(got.sort_index(), want.sort_index(), check_freq=False)
    except AssertionError:
        return False
    return True


def follows(client: WireClient, root: Path, want: pd.DataFrame, what: str) -> float:
    """Seconds until the served answer equals ``want`` (what local Qlib reads from the data now)."""
    started = time.monotonic()
    wait_until(lambda: same(served(client, root), want), 120, interval=1.0, what=what)
    return time.monotonic() - started


def test_a_server_started_after_a_field_was_added_serves_its_values(start_server, dataset, data):
    for path in data.glob("features/*/vwap.day.bin"):
        path.unlink()
    script = """
result = D.features(D.instruments("csi300"), ["$close", "$vwap", "$vwap/$close - 1"], "2019-01-02", "2019-12-31",
                    disk_cache=1)
"""
    first = start_server(provider_uri=str(data))
    before = run_pyqlib(script, first.port, data)
    assert before["$vwap"].isna().all() and before["$close"].notna().mean() > 0.9
    pdt.assert_frame_equal(before.sort_index(), local_qlib(script, data).sort_index(), check_freq=False)
    first.stop()

    for path in dataset.glob("features/*/vwap.day.bin"):  # $vwap now exists for every instrument
        shutil.copy(path, data / path.relative_to(dataset))
    second = start_server(provider_uri=str(data))
    after, local = run_pyqlib(script, second.port, data), local_qlib(script, data)
    print(f"\nbefore: $vwap {before['$vwap'].notna().mean():.0%} valued; after a restart on the new files: "
          f"{after['$vwap'].notna().mean():.0%} (local {local['$vwap'].notna().mean():.0%})")
    assert local["$vwap"].notna().mean() > 0.9
    pdt.assert_frame_equal(after.sort_index(), local.sort_index(), check_freq=False)


def test_a_running_server_follows_a_rewritten_and_a_removed_feature_file(start_server, data):
    server = start_server(provider_uri=str(data))
    with WireClient(server.url) as client:
        assert same(served(client, data), local_qlib(LOCAL, data))
        close = data / "features" / "sz000001" / "close.day.bin"
        values = np.fromfile(close, dtype="<f4")
        values[1:] *= 1.5
        values.tofile(close)
        (data / "features" / "sz000003" / "open.day.bin").unlink()
        want = local_qlib(LOCAL, data)
        assert want.loc["SZ000003", "$open"].isna().all() and want.loc["SZ000003", "$close"].notna().any()
        seconds = follows(client, data, want, "the answer to follow the changed files")
    print(f"\nthe answer followed a rewritten $close and a removed $open {seconds:.1f}s after they changed")
    assert "data changed" in server.log()


def test_a_running_server_follows_an_extended_history(start_server, data):
    server = start_server(provider_uri=str(data))
    days = (data / "calendars" / "day.txt").read_text().split()
    with WireClient(server.url) as client:
        assert served(client, data).index.get_level_values("datetime").max() == pd.Timestamp(days[-1])
        extend_dataset(data, 5)
        want = local_qlib(LOCAL, data)
        assert want.index.get_level_values("datetime").max() > pd.Timestamp(days[-1])
        seconds = follows(client, data, want, "the answer to hold the new days")
    print(f"\nthe answer held 5 more days {seconds:.1f}s after the data gained them")
