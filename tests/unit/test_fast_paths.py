"""The fast paths give what the slow ones gave: feature files read in one open, the dataset cache written
in one pass (the layout pyqlib's stock client and the transfer read), checked requests and cached
answers remembered by a handler."""

import socket

import fakeredis
import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import qlib
import socketio
from qlib.data.cache import DiskDatasetCache
from qlib.data.storage.file_storage import FileFeatureStorage

from qlib_server.config import make_config
from qlib_server.datagen import generate_dataset
from qlib_server.errors import RequestError
from qlib_server.front.handler import Frames, Packet, closes_late, make_parser, send_without_delay
from qlib_server.protocol import response, with_id
from qlib_server.state import keys
from qlib_server.state.cache import MISS, ResultCache
from qlib_server.worker.datacache import write_table
from qlib_server.worker.dataset import cache_layout
from qlib_server.worker.storage import FeatureFile


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("fast") / "data", instruments=5, days=80)
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR")
    return root


@pytest.mark.parametrize("window", [slice(None, None), slice(0, 10), slice(5, 79), slice(70, 200), slice(100, 120),
                                    slice(None, 3), slice(30, None)])
def test_a_feature_file_reads_the_series_qlib_reads_for_any_slice(root, window):
    for code in sorted(p.name for p in (root / "features").iterdir()):
        for field in ("close", "volume"):
            ours = FeatureFile(code, field, "day", provider_uri={"day": str(root)})[window]
            theirs = FileFeatureStorage(code, field, "day", provider_uri={"day": str(root)})[window]
            pdt.assert_series_equal(ours, theirs)


def test_a_missing_feature_file_reads_as_an_empty_series_like_qlib(root):
    ours = FeatureFile("sh999999", "close", "day", provider_uri={"day": str(root)})[0:10]
    assert ours.empty and ours.dtype == np.float32


def computed_frame() -> pd.DataFrame:
    """A frame as Qlib's ``dataset`` gives it: (instrument, datetime) index, expression columns."""
    days = pd.bdate_range("2020-01-01", periods=30)
    parts = {code: pd.DataFrame({"Mean($close, 5)": np.arange(30, dtype=np.float32) + i,
                                 "$close": np.linspace(1, 2, 30, dtype=np.float32) * (i + 1)},
                                index=pd.DatetimeIndex(days, name="datetime")).iloc[i * 3:]
             for i, code in enumerate(["SH600001", "SH600000", "SZ000002"])}
    return pd.concat(parts, names=["instrument"])


def test_the_one_pass_writer_keeps_qlibs_layout_and_reads_back_with_qlibs_reader(tmp_path):
    features, path = computed_frame(), tmp_path / "abc"
    write_table(path, [cache_layout(features)], {"market": "all", "filter_pipe": []}, "day", "2020-02-11")
    with pd.HDFStore(path, mode="r") as store:
        assert store.keys() == ["/df"] and store.get_storer("df").is_table
    expected_spans = DiskDatasetCache.IndexManager.build_index_from_data(
        features.swaplevel("instrument", "datetime").sort_index()).astype(np.int32)
    pdt.assert_frame_equal(pd.read_hdf(path.with_suffix(".index"), "df"), expected_spans, check_freq=False)
    meta = pd.read_pickle(path.with_suffix(".meta"))
    assert meta["info"]["fields"] == ["$close", "Mean($close,5)"] and meta["info"]["last_update"] == "2020-02-11"
    fields = ["Mean($close, 5)", "$close"]
    read = DiskDatasetCache.read_data_from_cache(path, "2020-01-10", "2020-02-04", fields)
    days = features.index.get_level_values("datetime")
    expected = features[(days >= "2020-01-10") & (days <= "2020-02-04")].sort_index()
    pdt.assert_frame_equal(read[fields].sort_index(), expected[fields], check_freq=False)


def test_a_parser_gives_the_same_request_for_a_body_it_checked_before_and_still_refuses_bad_ones():
    parser = make_parser(make_config(provider_uri="/nonexistent"))
    body = '{"start_time": null, "end_time": null, "freq": "day", "future": false}'
    first = parser.parse("calendar", {"head": {"version": "0.9.7"}, "body": body})
    assert parser.parse("calendar", {"head": {"version": "0.9.7"}, "body": body}) is first
    with pytest.raises(RequestError):
        parser.parse("calendar", {"head": {"version": "0.1.0"}, "body": body})  # another version: checked again
    with pytest.raises(RequestError):
        parser.parse("feature", {"head": {"version": "0.9.7"}, "body": body})  # another type: checked again


def test_a_handler_reuses_an_answer_for_a_second_and_never_across_generations():
    client = fakeredis.FakeRedis()
    cache = ResultCache(client, ttl=600, generation_check=0.0)
    cache.put("k", ["2020-01-02"])
    client.delete(keys.result(cache.generation(), "k"))
    assert cache.get("k") == ["2020-01-02"]  # remembered: no round trip
    cache.memo_seconds = 0.0
    assert cache.get("k") is MISS  # past the memo, Redis is asked again
    cache.memo_seconds = 1.0
    cache.put("k", ["2020-01-02"])
    client.incr(keys.GENERATION)  # another handler saw the data change
    assert cache.get("k") is MISS


def test_socketio_packets_still_find_binary_parts_anywhere_in_an_answer():
    assert not Packet.data_is_binary(["x", 1, 2.0, None, True, {"a": ["b", {"c": None}]}])
    assert Packet.data_is_binary(["x", {"a": [1, b"raw"]}])
    assert Packet.data_is_binary({"result": bytearray(b"x")})


def socketio_text(event, envelope):
    """What python-socketio sends for ``emit(event, envelope)`` on the default namespace."""
    return Packet(socketio.packet.EVENT, data=[event, envelope]).encode()


@pytest.mark.parametrize("result", [["2020-01-02 00:00:00", "2020-01-03 00:00:00"], "abc123", {"SH600000": [[
    "2020-01-02 00:00:00", "2020-03-01 00:00:00"]]}, [], None, ["é\u2028\"\\"]])
def test_an_answer_encoded_once_is_the_text_socketio_sends_with_or_without_a_request_id(result):
    frames = Frames()
    for envelope in (response(result, 0, None), with_id(response(result, 0, None), "r-1\"é")):
        assert frames.text("calendar_response", envelope) == socketio_text("calendar_response", envelope)
        assert frames.text("calendar_response", envelope) == socketio_text("calendar_response", envelope)  # reused


def test_an_answer_is_encoded_again_for_another_result_object_and_errors_are_left_to_socketio():
    frames = Frames()
    first, second = ["2020-01-02 00:00:00"], ["2020-01-02 00:00:00", "2020-01-03 00:00:00"]
    assert frames.text("calendar_response", response(first)) == socketio_text("calendar_response", response(first))
    assert frames.text("calendar_response", response(second)) == socketio_text("calendar_response", response(second))
    assert frames.text("calendar_response", response(None, 1, "bad")) is None
    assert frames.text("calendar_response", {"status": 0, "result": [], "detailed_info": None}) is None  # key order
    assert frames.text("feature_response", response({"x": b"raw"})) is None  # binary parts: socketio's attachments


# The upgrade requests' environs as the server saw them, from each client (python-engineio 4.15, websocket-client
# 1.9, aiohttp 3.14): only pyqlib's stock client (long-polling upgraded through websocket-client) closes late.
STOCK_PYQLIB = {"QUERY_STRING": "transport=websocket&EIO=4&sid=g3_9IGodgasesohUAAAA&t=1796498056.385994",
                "HTTP_UPGRADE": "websocket", "HTTP_ORIGIN": "http://127.0.0.1:18765"}
SYNC_WEBSOCKET = {"QUERY_STRING": "transport=websocket&EIO=4&t=1796498057.4238489", "HTTP_UPGRADE": "websocket",
                  "HTTP_ORIGIN": "http://127.0.0.1:18765"}
ASYNCIO = {"QUERY_STRING": "transport=websocket&EIO=4&t=1796498057.4048786", "HTTP_UPGRADE": "websocket",
           "HTTP_USER_AGENT": "Python/3.11 aiohttp/3.14.5"}
ASYNCIO_UPGRADED = {**ASYNCIO, "QUERY_STRING": "transport=websocket&EIO=4&sid=Qx2&t=1796498057.4"}
BROWSER = {"QUERY_STRING": "EIO=4&transport=websocket&sid=Qx3", "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64)"}


def test_only_the_stock_pyqlib_client_has_its_close_frame_answered_late():
    assert closes_late(STOCK_PYQLIB)
    assert not any(closes_late(e) for e in (SYNC_WEBSOCKET, ASYNCIO, ASYNCIO_UPGRADED, BROWSER, {}))


def test_every_connection_the_gevent_server_accepts_sends_without_nagles_delay():
    """gevent's WSGI handler sends a response's headers and body in two writes: with Nagle's algorithm on, each
    answer after a kept-alive connection's first waited for the client's delayed acknowledgement (44 ms)."""
    from geventwebsocket.handler import WebSocketHandler

    send_without_delay()
    send_without_delay()  # once is enough; again changes nothing
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, address = listener.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            handler = WebSocketHandler(accepted, address, None)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            handler.rfile.close()
