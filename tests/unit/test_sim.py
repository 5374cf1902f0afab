"""Tests of the load simulator: request universe and overlap, wire encoding, report math, and the verifier."""

import asyncio
import json
import pickle
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the sim package lives at the repo root

from qlib_server.config import ServerConfig  # noqa: E402
from qlib_server.datagen import generate_dataset  # noqa: E402
from qlib_server.front.handler import make_parser  # noqa: E402
from sim.client import connect, connect_sync, encode_body, fetch_metrics, metric_by_type, payload, request, request_sync  # noqa: E402
from sim.report import Rows, dedup_ratio, latency_table, percentiles, plot, throughput  # noqa: E402
from sim.universe import KINDS, Dataset, Sampler, Universe, parse_mix, parse_overlap, server_key  # noqa: E402
from sim.verify import Verifier, compare_frames  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("simdata"), instruments=12, days=160)


@pytest.fixture(scope="module")
def universe(dataset):
    return Universe(Dataset.load(dataset), size=60, seed=3)


# -- universe and overlap --------------------------------------------------------------------------
def test_the_universe_holds_distinct_work_of_every_type_from_the_dataset(dataset, universe):
    data = Dataset.load(dataset)
    assert set(data.markets) == {"all", "csi300", "csi100"} and len(data.calendar) == 160
    for kind in KINDS:
        works = [r.work for r in universe.requests[kind]]
        assert len(works) == 60 and len(set(works)) == 60
    for req in universe.requests["feature"]:
        codes = req.body["instruments"]
        assert isinstance(codes, dict) or set(codes) <= set(data.codes)
        assert req.body["disk_cache"] == 1


def test_the_same_seed_gives_every_process_the_same_universe(dataset, universe):
    again = Universe(Dataset.load(dataset), size=60, seed=3)
    assert all([r.id for r in again.requests[k]] == [r.id for r in universe.requests[k]] for k in KINDS)


def test_zipf_draws_collide_and_favour_the_most_popular_requests(universe):
    sampler = Sampler(universe, "zipf:1.2", {"feature": 1.0}, seed=1)
    draws = Counter(sampler.draw().work for _ in range(3000))
    ranked = [draws[r.work] for r in universe.requests["feature"]]
    assert ranked[0] > 3000 / 5  # 1 / sum(1/i**1.2, i=1..60) ~ 31% of the draws go to the top request
    assert ranked[0] > ranked[1] > ranked[10] and sum(ranked[30:]) < ranked[0]


def test_uniform_draws_spread_over_the_whole_universe(universe):
    sampler = Sampler(universe, "uniform", {"calendar": 1.0}, seed=1)
    draws = Counter(sampler.draw().work for _ in range(3000))
    assert len(draws) == 60 and max(draws.values()) < 3 * 3000 / 60


def test_unique_draws_never_repeat_within_or_across_workers(universe):
    samplers = [Sampler(universe, "unique", None, seed=5, shard=i, shards=2) for i in range(2)]
    works = [s.draw(kind).work for s in samplers for kind in KINDS for _ in range(400)]
    assert len(works) == len(set(works))


def test_the_mix_sets_the_share_of_each_request_type(universe):
    assert parse_mix("calendar=1,instrument=1,feature=2") == {"calendar": 0.25, "instrument": 0.25, "feature": 0.5}
    sampler = Sampler(universe, "uniform", parse_mix("calendar=0.2,feature=0.8"), seed=2)
    kinds = Counter(sampler.draw().kind for _ in range(4000))
    assert set(kinds) == {"calendar", "feature"} and 0.15 < kinds["calendar"] / 4000 < 0.25
    for bad in ("calendar=-1,feature=1", "bogus=1", "calendar=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    assert parse_overlap("zipf:1.5") == ("zipf", 1.5)
    with pytest.raises(ValueError):
        parse_overlap("zipf:0")


# -- wire encoding ---------------------------------------------------------------------------------
def test_bodies_in_pickle_and_json_decode_on_the_server_to_the_same_request(dataset, universe):
    parser = make_parser(ServerConfig(provider_uri=str(dataset)))
    sampler = Sampler(universe, "unique", None, seed=9)
    requests = [r for k in KINDS for r in universe.requests[k]] + [sampler.draw(k) for k in KINDS for _ in range(50)]
    keys = {}
    for req in requests:
        as_pickle = parser.parse(req.kind, payload(req.body, "pickle"))
        as_json = parser.parse(req.kind, payload(req.body, "json"))
        assert as_pickle.key == as_json.key and as_pickle.args == as_json.args
        keys.setdefault(req.work, set()).add(as_json.key)
    # the simulator's idea of "same work" is exactly the server's dedup key
    assert all(len(v) == 1 for v in keys.values())
    assert len({k for v in keys.values() for k in v}) == len(keys)


def test_encode_body_gives_pyqlib_pickle_bytes_and_json_text():
    body = {"start_time": "2020-01-02", "end_time": None, "freq": "day", "future": False}
    assert pickle.loads(encode_body(body, "pickle")) == body
    assert json.loads(encode_body(body, "json")) == body
    assert payload(body, "dict") == {"head": {"version": "0.9.7"}, "body": body}
    with pytest.raises(ValueError):
        encode_body(body, "xml")


def test_server_key_ignores_feature_dates_field_order_and_spaces():
    a = {"instruments": ["B", "A"], "fields": ["$close", "Mean($close, 5)"], "start_time": "2020-01-01",
         "end_time": None, "freq": "day", "disk_cache": 1}
    b = {**a, "instruments": ["A", "B"], "fields": ["Mean($close,5)", "$close"], "start_time": None}
    assert server_key("feature", a) == server_key("feature", b)
    assert server_key("feature", a) != server_key("feature", {**a, "fields": ["$close"]})
    assert server_key("calendar", {"start_time": "2020-01-01"}) != server_key("calendar", {"start_time": None})


# -- request helpers against a Socket.IO server that answers after a delay -------------------------
@pytest.fixture(scope="module")
def echo_server():
    """A Socket.IO server answering ``<kind>_request`` with the decoded body after body["delay"] seconds."""
    import socketio
    from aiohttp import web

    sio = socketio.AsyncServer(async_mode="aiohttp")
    app = web.Application()
    sio.attach(app)

    async def metrics(_):
        return web.Response(text='# HELP x\nqlib_server_tasks_published_total{type="feature"} 3.0\n'
                                 'qlib_server_tasks_published_total{type="calendar"} 2.0\n')
    app.router.add_get("/metrics", metrics)

    def handler(kind):
        async def on_request(sid, message):
            body = message["body"]
            body = pickle.loads(body) if isinstance(body, bytes) else json.loads(body)
            await asyncio.sleep(body.get("delay", 0))
            await sio.emit(f"{kind}_response", {"result": body["n"], "status": 0, "detailed_info": None}, to=sid)
        return on_request

    for kind in KINDS:
        sio.on(f"{kind}_request", handler(kind))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"

    async def close():
        await sio.shutdown()
        await runner.cleanup()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_async_request_drops_the_late_answer_of_a_timed_out_request(echo_server):
    async def scenario():
        sio = await connect(echo_server)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await request(sio, "feature", {"n": 1, "delay": 0.5}, "pickle", timeout=0.1)
            second = await request(sio, "feature", {"n": 2, "delay": 0.8}, "json", timeout=5)
            both = await asyncio.gather(request(sio, "calendar", {"n": 3}, "json", 5),
                                        request(sio, "feature", {"n": 4}, "pickle", 5))
            return second, both
        finally:
            await sio.disconnect()

    second, both = asyncio.run(scenario())
    assert second["result"] == 2
    assert [m["result"] for m in both] == [3, 4]


def test_sync_request_pairs_each_answer_with_its_request(echo_server):
    sio = connect_sync(echo_server)
    try:
        with pytest.raises(TimeoutError):
            request_sync(sio, "instrument", {"n": 1, "delay": 0.5}, "json", timeout=0.1)
        assert request_sync(sio, "instrument", {"n": 2, "delay": 0.8}, "pickle", timeout=5)["result"] == 2
    finally:
        sio.disconnect()


def test_metrics_are_summed_per_type(echo_server):
    published = metric_by_type(fetch_metrics(echo_server), "qlib_server_tasks_published_total")
    assert published == {"feature": 3.0, "calendar": 2.0}


# -- report math -----------------------------------------------------------------------------------
def test_percentiles_interpolate_between_order_statistics_in_milliseconds():
    seconds = np.arange(1, 101) / 1000.0  # 1..100 ms
    assert percentiles(seconds) == {"p50": 50.5, "p90": 90.1, "p99": 99.01}
    assert percentiles([0.2]) == {"p50": 200.0, "p90": 200.0, "p99": 200.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_latency_table_counts_only_answered_requests_per_type(tmp_path):
    rows = Rows(kinds=[0, 0, 2, 2, 2], starts=[0, 0.5, 1, 1.5, 2], latencies=[0.01, 0.03, 0.1, 0.2, 9.0],
                outcomes=[0, 0, 0, 0, 2])
    table = latency_table(rows)
    assert set(table) == {"calendar", "feature", "all"}
    assert table["calendar"]["count"] == 2 and table["calendar"]["p50"] == 20.0
    assert table["feature"]["count"] == 2 and table["feature"]["max"] == 200.0
    assert table["all"]["count"] == 4
    assert throughput(rows, 2.5) == 2.0
    assert dedup_ratio(25, 100) == 0.75 and dedup_ratio(0, 0) is None
    plot(rows, tmp_path / "plot.png", "test", {"features": [1.0, 1.2]})
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- verifier --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verifier(dataset):
    return Verifier(dataset)


def _write_dataset_cache(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` as Qlib's dataset cache does (DiskDatasetCache.gen_dataset_cache's layout)."""
    from qlib.data.cache import DiskDatasetCache
    from qlib.utils import remove_fields_space

    data = frame.swaplevel("instrument", "datetime").sort_index()
    data.columns = remove_fields_space(data.columns)
    data = data.loc[:, sorted(data.columns)]
    with pd.HDFStore(str(path)) as store:
        store.append("df", data, append=False)
    index = DiskDatasetCache.IndexManager(path)
    index.update(index.build_index_from_data(data))


def test_verifier_accepts_right_calendars_and_instruments_and_refuses_wrong_ones(verifier):
    from qlib.data import D

    body = {"start_time": "2018-02-01", "end_time": "2018-05-01", "freq": "day", "future": False}
    days = [str(t) for t in D.calendar("2018-02-01", "2018-05-01")]
    assert verifier.check("calendar", body, days) is None
    assert verifier.check("calendar", body, days[:-1]) is not None
    assert verifier.check("calendar", body, "nope") is not None

    market = {"market": "csi300", "filter_pipe": [{"filter_type": "NameDFilter", "name_rule_re": "SH[0-9]+",
                                                   "filter_start_time": None, "filter_end_time": None}]}
    listing = {"instruments": market, "start_time": None, "end_time": None, "freq": "day", "as_list": True}
    codes = list(D.list_instruments(D.instruments("csi300", filter_pipe=[]), as_list=True))
    sh = [c for c in codes if c.startswith("SH")]
    assert verifier.check("instrument", listing, sh[::-1]) is None
    assert verifier.check("instrument", listing, codes) is not None

    spans_body = {**listing, "as_list": False, "instruments": {"market": "csi300", "filter_pipe": []}}
    spans = {c: [[str(s), str(e)] for s, e in v] for c, v in D.list_instruments(D.instruments("csi300")).items()}
    assert verifier.check("instrument", spans_body, spans) is None
    code = next(iter(spans))
    shifted = {**spans, code: [[spans[code][0][0], "2018-01-05 00:00:00"]]}
    assert "spans" in verifier.check("instrument", spans_body, shifted)


def test_verifier_reads_the_dataset_cache_and_refuses_wrong_data(dataset, verifier):
    from qlib.data import D

    codes, fields = ["SH600000", "SZ000001", "SH600004"], ["Mean($close, 5)", "$volume", "EMA($close, 12)"]
    whole = D.features(codes, fields)
    cache = Path(dataset) / "dataset_cache"
    cache.mkdir(exist_ok=True)
    _write_dataset_cache(cache / "right", whole)
    _write_dataset_cache(cache / "window", D.features(codes, fields, "2018-03-01"))  # from the request's start
    wrong = whole.copy()
    wrong.iloc[len(wrong) // 2, 0] += 1.0
    _write_dataset_cache(cache / "wrong", wrong)
    _write_dataset_cache(cache / "short", whole.iloc[: len(whole) - 3])

    body = {"instruments": codes, "fields": fields, "start_time": "2018-03-01", "end_time": "2018-06-29",
            "freq": "day", "disk_cache": 1}
    whole_history = {**body, "start_time": None, "end_time": None}
    assert verifier.check("feature", body, "window") is None
    assert "EMA" in verifier.check("feature", body, "right")  # the whole history cut: not what local Qlib gives
    assert verifier.check("feature", whole_history, "right") is None
    assert "values differ" in verifier.check("feature", whole_history, "wrong")
    assert "rows" in verifier.check("feature", whole_history, "short")
    assert "does not exist" in verifier.check("feature", body, "missing")
    assert "not a dataset cache file name" in verifier.check("feature", body, "../right")
    assert verifier.check("feature", {**body, "fields": ["$close"]}, "right") is not None
    assert verifier.check("feature", {**body, "disk_cache": 0}, "") is None


def test_compare_frames_treats_nan_as_equal_and_aligns_columns():
    index = pd.MultiIndex.from_product([["A"], pd.date_range("2020-01-01", periods=3)], names=["instrument",
                                                                                               "datetime"])
    want = pd.DataFrame({"x": [1.0, np.nan, 3.0], "y": [4.0, 5.0, 6.0]}, index=index)
    assert compare_frames(want[["y", "x"]].astype("float32"), want) is None
    assert compare_frames(want.assign(x=[1.0, 2.0, 3.0]), want) is not None
    assert "missing" in compare_frames(want[["x"]], want)
