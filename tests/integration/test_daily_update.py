"""The daily update: trading days appended to the data under a running server. Its dataset caches are extended
by the new days (only the rows they change computed, as a segment of their own; a refresh, once its caches are
current, writes each again as one segment), in the background before anyone asks, and
every client then gets what local Qlib computes on the new data; any other change is computed again.

Each test changes its own copy of the session dataset; the server runs on its defaults (RabbitMQ, Redis)."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest
import requests
from clients import local_qlib, run_pyqlib, run_server_client
from conftest import wait_until

from qlib_server.datagen_updates import (
    add_field,
    append_days,
    change_factor,
    delist_instrument,
    list_instrument,
    rewrite_value,
)
from qlib_server.state import records

pytestmark = pytest.mark.integration

FIELDS = ["$close", "Mean($close, 5)", "Std($close, 20)/$close", "Corr($close, Log($volume+1), 10)",
          "EMA($close, 12)", "Slope($close, 10)", "Ref($close, -2)/Ref($close, -1) - 1"]  # the last: a label
SCRIPT = f"result = D.features(D.instruments('csi300'), {FIELDS!r})"


@pytest.fixture
def data(dataset, tmp_path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "data", ignore=shutil.ignore_patterns("*_cache")))


def caches(root: Path) -> dict:
    """Each dataset cache's records: the names of its segment files (one: computed in full, or extended by a
    refresh, which writes it as one; more: extended by a request). A computation writes new files."""
    found = {}
    for manifest in (root / "dataset_cache").glob("*.records"):
        try:
            found[manifest.stem] = records.read(manifest.with_suffix("")).files
        except (OSError, ValueError):
            continue
    return found


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got.equals(want)
    pdt.assert_frame_equal(got, want)


def refresh(server) -> dict:
    """The last refresh's extension of caches, as the status page shows it."""
    return requests.get(f"{server.url}/status.json", timeout=10).json()["refresh"]


def extended(root: Path, segments: int) -> bool:
    return [len(files) for files in caches(root).values()] == [segments]


def extensions(server) -> int:
    """How many times the server's processors extended a dataset cache, as its log says."""
    return len(re.findall(r"dataset cache \w+ extended:", server.log()))


@pytest.mark.parametrize("days", [1, 5], ids=["one day", "five days"])
def test_appended_days_extend_the_cache_before_anyone_asks_and_clients_get_qlibs_new_values(start_server, data,
                                                                                              days):
    server = start_server(provider_uri=str(data))
    before = run_server_client(SCRIPT, server.port, None)
    assert_same(before, local_qlib(SCRIPT, data))
    computed = caches(data)
    assert extended(data, 1)
    append_days(data, days)
    wait_until(lambda: extensions(server) == 1, 120, what="the cache extended by the refresh")
    wait_until(lambda: refresh(server).get("state") == "done", 60, what="the refresh done on the status page")
    assert {k: refresh(server)[k] for k in ("total", "extended", "failed")} == {"total": 1, "extended": 1, "failed": 0}
    written = caches(data)
    assert extended(data, 1) and written != computed  # written again as one segment, for clients that map it
    after, local = run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data)
    assert len(after) > len(before)
    assert_same(after, local)
    assert caches(data) == written  # served as extended: not computed again
    stock = run_pyqlib(SCRIPT, server.port, data)  # Qlib's HDF5 form, made from the extended records
    assert_same(stock, local)


def test_a_past_value_rewritten_with_the_appended_days_is_computed_again(start_server, data):
    server = start_server(provider_uri=str(data))
    run_server_client(SCRIPT, server.port, None)
    append_days(data, 1)
    rewrite_value(data, "SZ000001", "close", 400, 12.5)
    wait_until(lambda: caches(data) == {}, 120, what="the stale cache dropped by the refresh")
    assert_same(run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data))
    assert extended(data, 1)  # computed again in full


def test_an_instrument_listed_in_the_market_is_computed_again(start_server, data):
    server = start_server(provider_uri=str(data))
    run_server_client(SCRIPT, server.port, None)
    append_days(data, 1)
    list_instrument(data, "csi300", "SH600999", first_day=700)
    wait_until(lambda: caches(data) == {}, 120, what="the stale cache dropped by the refresh")
    after, local = run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data)
    assert "SH600999" in after.index.get_level_values("instrument")
    assert_same(after, local)


def test_an_instrument_delisted_from_the_market_is_computed_again(start_server, data):
    server = start_server(provider_uri=str(data))
    before = run_server_client(SCRIPT, server.port, None)
    append_days(data, 1)
    delist_instrument(data, "csi300", "SZ000003", last_day=600)
    wait_until(lambda: caches(data) == {}, 120, what="the stale cache dropped by the refresh")
    after, local = run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data)
    assert len(after.loc["SZ000003"]) < len(before.loc["SZ000003"])
    assert_same(after, local)


def test_a_field_added_to_the_data_is_computed_again(start_server, data):
    script = "result = D.features(D.instruments('csi300'), ['$close', 'Mean($close + $adj, 5)', '$adj'])"
    server = start_server(provider_uri=str(data))
    before = run_server_client(script, server.port, None)
    assert before["$adj"].isna().all()
    append_days(data, 1)
    add_field(data, "adj")
    wait_until(lambda: caches(data) == {}, 120, what="the stale cache dropped by the refresh")
    after, local = run_server_client(script, server.port, None), local_qlib(script, data)
    assert after["$adj"].notna().mean() > 0.9
    assert_same(after, local)


def test_a_changed_adjustment_factor_is_computed_again(start_server, data):
    script = "result = D.features(D.instruments('csi300'), ['$close', '$factor', 'Mean($close / $factor, 5)'])"
    server = start_server(provider_uri=str(data))
    before = run_server_client(script, server.port, None)
    append_days(data, 1)
    change_factor(data, "SZ000001", from_day=400, ratio=1.25)
    wait_until(lambda: caches(data) == {}, 120, what="the stale cache dropped by the refresh")
    after, local = run_server_client(script, server.port, None), local_qlib(script, data)
    old, new = (frame.loc["SZ000001", "$factor"].iloc[400:450] for frame in (before, after))
    assert (new.to_numpy() != old.to_numpy()).all()
    assert_same(after, local)


# The worker's own code, run in a process of its own that is killed (SIGKILL) right after one step of an
# extension: the new segment written, the new checkpoint saved, or the records' manifest published.
KILLED_EXTENSION = """
import os, signal, sys
from pathlib import Path
import qlib
from qlib_server.state import records
from qlib_server.worker import extension, storage
root, step = Path(sys.argv[1]), sys.argv[2]
qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR",
          feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
owner, name = {"segment": (records.Writer, "close"), "checkpoint": (extension, "save_checkpoint"),
               "manifest": (records, "publish")}[step]
done = getattr(owner, name)
def killed(*args, **kwargs):
    done(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, name, killed)
[path] = [p.with_suffix("") for p in (root / "dataset_cache").glob("*.records")]
extension.extend_cache(path)
"""


@pytest.mark.parametrize("step", ["segment", "checkpoint", "manifest"])
def test_a_worker_killed_mid_extension_leaves_a_cache_extended_or_computed_again_never_served_half_written(
        start_server, data, step):
    server = start_server(provider_uri=str(data))
    run_server_client(SCRIPT, server.port, None)
    server.stop()
    append_days(data, 1)
    killed = subprocess.run([sys.executable, "-c", KILLED_EXTENSION, str(data), step], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    server = start_server(provider_uri=str(data))
    wait_until(lambda: refresh(server).get("state") == "done", 60, what="the refresh at start done")
    assert_same(run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data))
    stock = run_pyqlib(SCRIPT, server.port, data)  # Qlib's HDF5 form, made from the records served
    assert_same(stock, local_qlib(SCRIPT, data))


def test_with_two_data_processors_each_cache_is_extended_once(start_server, data):
    server = start_server(provider_uri=str(data))
    other = start_server(modules=("data_processor",), provider_uri=str(data))
    wait_until(lambda: "data refreshed" in other.log(), 120, what="the second processor started")
    run_server_client(SCRIPT, server.port, None)
    append_days(data, 1)
    for processor in (server, other):  # both notice the change and refresh
        wait_until(lambda p=processor: p.log().count("data refreshed") >= 2, 120, what="a processor's refresh")
    refreshed = [int(n) for p in (server, other) for n in re.findall(r"extended (\d+) dataset caches", p.log())]
    assert sum(refreshed) == 1, refreshed  # one of them extended it; the other found it current
    assert extensions(server) + extensions(other) == 1
    assert_same(run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data))


READER = f"""
import hashlib, time
result = []
deadline = time.monotonic() + 40
while time.monotonic() < deadline:
    frame = D.features(D.instruments('csi300'), {FIELDS!r})
    result.append(hashlib.sha256(frame.to_numpy().tobytes() + repr(frame.index.tolist()).encode()).hexdigest())
"""


def test_clients_reading_while_a_cache_is_extended_get_the_old_or_the_new_frame_never_a_mix(start_server, data):
    server = start_server(provider_uri=str(data))
    old = local_qlib(SCRIPT, data)
    run_server_client(SCRIPT, server.port, None)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(run_server_client, READER, server.port, None)
        wait_until(lambda: sum(server.log().count(f"feature {how} to") for how in ("transfer", "placement")) >= 3, 60,
                   what="the reader reading")  # the files mapped (on this host) or streamed
        append_days(data, 1)
        wait_until(lambda: extensions(server) == 1, 120, what="the cache extended by the refresh")
        seen = reading.result()
    new = local_qlib(SCRIPT, data)
    digest = {name: hashlib.sha256(frame.to_numpy().tobytes() + repr(frame.index.tolist()).encode()).hexdigest()
              for name, frame in (("old", old), ("new", new))}
    assert set(seen) <= set(digest.values()), "a frame that is neither the old data's nor the new data's"
    assert digest["old"] in seen and digest["new"] in seen, "the reader saw only one version"


def test_a_cache_not_used_lately_is_extended_at_its_next_request_not_in_the_background(start_server, data):
    """``refresh_recent_days: 0``: the refresh extends nothing in the background; the next request does."""
    server = start_server(provider_uri=str(data), refresh_recent_days=0)
    run_server_client(SCRIPT, server.port, None)
    append_days(data, 1)
    wait_until(lambda: refresh(server).get("state") == "done", 60, what="the refresh done")
    assert {k: refresh(server)[k] for k in ("total", "extended", "later")} == {"total": 0, "extended": 0, "later": 1}
    assert extended(data, 1)  # not extended yet, not dropped either
    assert_same(run_server_client(SCRIPT, server.port, None), local_qlib(SCRIPT, data))
    assert extended(data, 2)  # extended by the request, not computed again
