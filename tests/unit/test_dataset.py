"""The server's dataset computation gives the frame Qlib's ``LocalDatasetProvider.dataset`` gives: the
same values, index (levels and their dtypes), columns and dtypes, for markets with listing spans,
lists, any fields and windows, fields that start on different days, and no rows at all."""

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import qlib

from qlib_server.datagen import generate_dataset
from qlib_server.engine import features
from qlib_server.worker import dataset, storage

FIELDS = ["Mean($close, 5)", "Std($close, 20)", "Max( $high, 3 )", "$close > $open", "Ref($volume, 1)", "$late",
          "Mean($close, 5)", "$late + $close", "Greater($late, $open)"]


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("dataset") / "data", instruments=12, days=120)
    codes = sorted(p.name for p in (root / "features").iterdir())
    for i, code in enumerate(codes[:6]):  # a field that starts later than the others, or is missing
        start = 10 + 7 * i
        np.concatenate([[start], np.linspace(1, 2, 120 - start)]).astype("<f4").tofile(
            root / "features" / code / "late.day.bin")
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR", kernels=1,
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    from qlib.data.data import DatasetD

    return DatasetD._provider


def both(provider, instruments, fields, start, end, qlib_builds=False):
    """The server's frame and Qlib's; unless ``qlib_builds``, the server's is built without Qlib's code."""
    from qlib.data.cache import H

    H.clear()
    theirs = provider.dataset(instruments, fields, start, end, "day")
    H.clear()
    with pytest.MonkeyPatch.context() as patch:
        if not qlib_builds:
            patch.setattr(provider, "dataset", lambda *a, **k: pytest.fail("the frame was left to Qlib"))
        ours = dataset.dataset(provider, instruments, fields, start, end, "day")
    return ours, theirs


def assert_same_frame(ours, theirs):
    pdt.assert_frame_equal(ours, theirs, check_exact=True)
    assert [level.dtype for level in ours.index.levels] == [level.dtype for level in theirs.index.levels]
    assert ours.index.names == theirs.index.names


MARKETS = [{"market": "all", "filter_pipe": []}, {"market": "csi300", "filter_pipe": []},
           {"market": "csi100", "filter_pipe": []}]
WINDOWS = [(None, None), ("2018-01-20", "2018-04-10"), ("2018-05-01", "2018-06-29"), ("2018-03-01", "2018-03-01")]


@pytest.mark.parametrize("instruments", MARKETS, ids=["all", "csi300", "csi100"])
@pytest.mark.parametrize("window", WINDOWS, ids=["everything", "middle", "end", "one-day"])
def test_a_market_gives_qlibs_frame_for_any_window(provider, instruments, window):
    assert_same_frame(*both(provider, instruments, FIELDS, *window))


@pytest.mark.parametrize("instruments", MARKETS, ids=["all", "csi300", "csi100"])
def test_the_cache_layout_is_qlibs_frame_as_qlibs_cache_writer_lays_it_out(provider, instruments):
    from qlib.data.cache import H
    from qlib.data.data import Cal

    calendar = Cal.calendar(freq="day")
    H.clear()
    theirs = dataset.cache_layout(provider.dataset(instruments, FIELDS, calendar[0], calendar[-1], "day"))
    H.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(provider, "dataset", lambda *a, **k: pytest.fail("the frame was left to Qlib"))
        pieces = list(dataset.cache_rows(provider, instruments, FIELDS, calendar[0], calendar[-1], "day").frames())
    ours = pd.concat(pieces)
    assert_same_frame(ours, theirs)
    assert list(ours.index.names) == ["datetime", "instrument"] and list(ours.columns) == sorted(set(ours.columns))


def test_the_cache_layout_comes_in_pieces_of_consecutive_days_that_make_qlibs_frame(provider, monkeypatch):
    from qlib.data.cache import H
    from qlib.data.data import Cal

    calendar = Cal.calendar(freq="day")
    market = {"market": "all", "filter_pipe": []}
    H.clear()
    theirs = dataset.cache_layout(provider.dataset(market, FIELDS, calendar[0], calendar[-1], "day"))
    H.clear()
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4 * len(set(FIELDS)) * 100)  # about 100 rows a piece
    pieces = list(dataset.cache_rows(provider, market, FIELDS, calendar[0], calendar[-1], "day").frames())
    assert len(pieces) > 10
    days = [piece.index.get_level_values("datetime") for piece in pieces]
    assert all(a.max() < b.min() for a, b in zip(days, days[1:]))  # a day is never split between pieces
    assert_same_frame(pd.concat(pieces), theirs)


@pytest.mark.parametrize("by", ["engine", "engine as it computes", "qlib"])
def test_the_records_file_of_a_cache_holds_qlibs_frame_row_for_row(provider, monkeypatch, tmp_path, by):
    from qlib.data.cache import H
    from qlib.data.data import Cal

    from qlib_server.state import records
    from qlib_server.worker import datacache

    calendar = Cal.calendar(freq="day")
    market = {"market": "csi300", "filter_pipe": []}
    H.clear()
    theirs = dataset.cache_layout(provider.dataset(market, FIELDS, calendar[0], calendar[-1], "day"))
    H.clear()
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4 * len(set(FIELDS)) * 100)  # several parts
    if by == "qlib":
        monkeypatch.setattr(dataset, "compute", lambda *a, **k: None)
    monkeypatch.setattr(features, "BLOCK_BYTES", 1)  # a block per instrument: written one after the other
    segment = records.segment_path(tmp_path / "c") if by == "engine as it computes" else None
    datacache.write_records(tmp_path / "c", dataset.cache_rows(provider, market, FIELDS, calendar[0], calendar[-1],
                                                               "day", segment=segment))
    table = records.read(tmp_path / "c")
    datetime, instrument, values = table.take()
    assert np.all(np.lexsort((datetime, instrument)) == np.arange(len(datetime)))  # by instrument, then day
    by_day = np.argsort(datetime, kind="stable")
    datetime, instrument, values = datetime[by_day], instrument[by_day], values[by_day]
    codes = np.array(table.codes, dtype=object)[instrument]
    index = pd.MultiIndex.from_arrays([pd.DatetimeIndex(datetime), codes], names=["datetime", "instrument"])
    ours = pd.DataFrame(values, index=index, columns=table.columns)
    asked = list(dict.fromkeys(f.replace(" ", "") for f in FIELDS))  # the engine keeps the request's order (a client
    assert table.columns == (sorted(asked) if by == "qlib" else asked)  # of that order maps the file as it is)
    assert_same_frame(ours[sorted(asked)], theirs)
    counts = theirs.groupby(level="instrument").size()
    assert [[c, n] for c, n in zip(table.codes, table.counts.tolist())] == [[c, int(n)] for c, n in counts.items()]
    assert table.select(calendar[10], calendar[20]).rows == len(theirs.loc[calendar[10]:calendar[20]])
    assert np.array_equal(table.days, np.unique(theirs.index.get_level_values("datetime").to_numpy()))


def test_qlibs_hdf5_files_written_from_a_records_file_read_as_qlib_computed_them(provider, monkeypatch, tmp_path):
    """A cache computed for qlib_server.client (records only) gets Qlib's HDF5 form, for a stock client, from its
    records: nothing computed again, and Qlib's reader reads what local Qlib computes."""
    from qlib.data.cache import DiskDatasetCache, H
    from qlib.data.data import Cal

    from qlib_server.state.sources import HDF5, RECORDS, is_current, write_sources
    from qlib_server.worker import datacache

    calendar = Cal.calendar(freq="day")
    market = {"market": "csi300", "filter_pipe": []}
    H.clear()
    theirs = provider.dataset(market, FIELDS, calendar[0], calendar[-1], "day")
    H.clear()
    path = tmp_path / "dataset_cache" / "c"
    path.parent.mkdir()
    datacache.write_records(path, dataset.cache_rows(provider, market, FIELDS, calendar[0], calendar[-1], "day"))
    write_sources(path, {}, (RECORDS,))
    assert is_current(path, form=RECORDS) and not is_current(path, form=HDF5)
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 4 * len(set(FIELDS)) * 100)  # several pieces of whole days
    monkeypatch.setattr(dataset, "compute", lambda *a, **k: pytest.fail("computed again"))
    datacache.add_hdf5(path, market, "day")
    assert is_current(path, form=HDF5) and is_current(path, form=RECORDS)
    reference = tmp_path / "qlib"  # Qlib's frame in Qlib's cache layout
    datacache.write_table(reference, [dataset.cache_layout(theirs)], market, "day", str(calendar[-1]))
    for window in [(None, None), (calendar[10], calendar[50])]:
        pdt.assert_frame_equal(DiskDatasetCache.read_data_from_cache(path, *window, FIELDS),
                               DiskDatasetCache.read_data_from_cache(reference, *window, FIELDS), check_exact=True)


@pytest.mark.parametrize("rule", ["$close > 20", "Mean($close, 5) > Ref($close, 3)", "$late > 1.5"])
def test_an_expression_filter_computed_by_the_engine_lists_what_qlib_lists(provider, monkeypatch, rule):
    """The server's dataset cache computes what uses no cache (disk_cache=0, as ExpressionDFilter asks) with
    the engine: the same instruments and spans as Qlib's own filtering."""
    from qlib.data.cache import H
    from qlib.data.data import InstrumentProvider
    from qlib.data.filter import ExpressionDFilter, NameDFilter

    from qlib_server.worker.datacache import ServerDatasetCache

    server = ServerDatasetCache.__new__(ServerDatasetCache)  # no Redis: only its dataset() is used
    server.provider = provider
    pipe = [NameDFilter(name_rule_re="^S[HZ]").to_config(), ExpressionDFilter(rule_expression=rule).to_config()]
    market = InstrumentProvider.instruments("csi300", filter_pipe=pipe)
    from qlib.data import data as qlib_data

    H.clear()
    theirs = qlib_data.D.list_instruments(market, "2018-02-01", "2018-05-31")
    H.clear()
    monkeypatch.setattr(qlib_data.DatasetD, "_provider", server)
    monkeypatch.setattr(provider, "dataset", lambda *a, **k: pytest.fail("the rule was left to Qlib"))
    ours = qlib_data.D.list_instruments(market, "2018-02-01", "2018-05-31")
    unfiltered = qlib_data.D.list_instruments(InstrumentProvider.instruments("csi300"), "2018-02-01", "2018-05-31")
    assert ours == theirs and theirs != unfiltered  # the rule removed days, the same ones


def test_a_set_larger_than_memory_allows_is_computed_in_a_scratch_file_that_leaves_nothing(provider, monkeypatch,
                                                                                            tmp_path):
    from qlib.data.cache import H
    from qlib.data.data import Cal

    calendar = Cal.calendar(freq="day")
    market = {"market": "all", "filter_pipe": []}
    H.clear()
    theirs = dataset.cache_layout(provider.dataset(market, FIELDS, calendar[0], calendar[-1], "day"))
    H.clear()
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 1)
    computed = dataset.compute(provider, market, FIELDS, calendar[0], calendar[-1], "day", scratch=tmp_path)
    assert isinstance(computed.dense, np.memmap) and list(tmp_path.iterdir()) == []
    assert_same_frame(pd.concat(computed.by_date()), theirs)


def test_a_list_of_instruments_with_repeats_and_unknown_codes_gives_qlibs_frame(provider):
    from qlib.data.data import Cal

    codes = [str(c) for c in provider.get_instruments_d({"market": "all", "filter_pipe": []}, "day")][:5]
    calendar = Cal.calendar(freq="day")
    ours, theirs = both(provider, codes[::-1] + codes[:2] + ["SH999999"], FIELDS[:4], calendar[0], calendar[-1])
    assert_same_frame(ours, theirs)
    assert len(ours.index.get_level_values(0).unique()) == 5


def test_fields_missing_for_every_instrument_give_qlibs_empty_frame(provider):
    ours, theirs = both(provider, {"market": "all", "filter_pipe": []}, ["$nosuchfield"], None, None, qlib_builds=True)
    assert ours.empty
    assert_same_frame(ours, theirs)


def test_a_window_with_no_trading_day_gives_qlibs_empty_frame(provider):
    ours, theirs = both(provider, {"market": "all", "filter_pipe": []}, FIELDS[:2], "2030-01-01", "2030-02-01",
                        qlib_builds=True)
    assert ours.empty
    assert_same_frame(ours, theirs)


def test_a_field_qlib_cannot_evaluate_fails_as_it_does_in_qlib(provider):
    from qlib.data.cache import H

    with pytest.raises(Exception) as theirs:
        provider.dataset(["SH600000"], ["Mean($close)"], None, None, "day")
    H.clear()
    with pytest.raises(type(theirs.value)):
        dataset.dataset(provider, ["SH600000"], ["Mean($close)"], None, None, "day")


def test_a_field_left_to_qlib_whose_values_are_not_float32_leaves_the_frame_to_qlib(provider, monkeypatch):
    from qlib.data.data import ExpressionD

    original = type(ExpressionD._provider).expression

    def as_float64(self, *args, **kwargs):
        return original(self, *args, **kwargs).astype(np.float64)

    monkeypatch.setattr(type(ExpressionD._provider), "expression", as_float64)
    fields = ["Ref($close > $open, 1)"] + FIELDS[:2]  # the engine leaves the first to Qlib (booleans shifted)
    ours, theirs = both(provider, {"market": "csi300", "filter_pipe": []}, fields, None, None, qlib_builds=True)
    assert set(ours.dtypes) == {np.dtype(np.float64)}
    assert_same_frame(ours, theirs)


@pytest.mark.parametrize("unit", ["D", "s", "us", "ns"])
def test_a_row_is_kept_on_the_days_of_its_listing_spans_both_ends_included_whatever_the_units(unit):
    rng = np.random.default_rng(7)
    times = np.unique(rng.integers(0, 10**6, 400)).astype("M8[s]").astype(f"M8[{unit}]")
    spans_of = []
    for _ in range(200):
        spans = []
        for _ in range(rng.integers(0, 3)):
            first, last = np.sort(rng.integers(-10**5, 11 * 10**5, 2))
            begin = pd.Timestamp(int(first) * 10**9 + int(rng.integers(0, 10**9)))  # a fraction of a second
            spans.append((begin, pd.Timestamp(int(last), unit="s")))
        spans.append((str(times[rng.integers(0, len(times))]), pd.Timestamp(times[rng.integers(0, len(times))])))
        each_day = np.zeros(len(times), dtype=bool)
        for begin, end in spans:
            each_day |= (times >= pd.Timestamp(begin).to_datetime64()) & (times <= pd.Timestamp(end).to_datetime64())
        spans_of.append((spans, each_day))
    spans_of += [(None, np.ones(len(times), dtype=bool)), ([], np.zeros(len(times), dtype=bool))]
    assert np.array_equal(dataset.listed(times, [s for s, _ in spans_of]), np.array([d for _, d in spans_of]))


@pytest.mark.parametrize("instruments", [[], {}], ids=["no codes", "no codes and spans"])
def test_a_request_of_no_instruments_is_qlibs_empty_frame(provider, instruments):
    from qlib.data.data import Cal

    calendar = Cal.calendar(freq="day")
    assert dataset.compute(provider, instruments, FIELDS, calendar[0], calendar[-1], "day") is None
    theirs = provider.dataset(instruments, FIELDS, calendar[0], calendar[-1], "day")
    ours = dataset.dataset(provider, instruments, FIELDS, calendar[0], calendar[-1], "day")
    assert ours.empty and theirs.empty and list(ours.columns) == list(theirs.columns)


def test_a_computation_that_fails_midway_leaves_no_records_file_behind(provider, monkeypatch, tmp_path):
    from qlib.data.data import Cal

    from qlib_server.state import records

    calendar = Cal.calendar(freq="day")
    monkeypatch.setattr(features, "BLOCK_BYTES", 1)  # a block per instrument
    calls = []
    spans = dataset.listed

    def failing_on_the_third_block(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return spans(*args)

    monkeypatch.setattr(dataset, "listed", failing_on_the_third_block)
    with pytest.raises(RuntimeError, match="disk full"):
        dataset.cache_rows(provider, {"market": "csi300", "filter_pipe": []}, FIELDS, calendar[0], calendar[-1],
                           "day", segment=records.segment_path(tmp_path / "c"))
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []
