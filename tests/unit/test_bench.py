"""The benchmark's goals table and comparison, and the simulator's lanes and server view."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the sim package lives at the repo root

from sim import bench  # noqa: E402
from sim.bench_measure import cold_fields, light_bodies, pct  # noqa: E402
from sim.bench_report import comparison, goals, row  # noqa: E402
from sim.report import LANES, Rows, histogram_quantiles, lane_table, server_view  # noqa: E402
from sim.universe import KINDS, Request  # noqa: E402


def results(scale=1.0):
    """A run's results as :func:`sim.bench.run_all` writes them."""
    lat = {k: {"p50_ms": 1.0 * scale, "p90_ms": 2.0, "p99_ms": 3.0, "n": 10} for k in ("calendar", "instrument",
                                                                                       "feature")}
    return {
        "machine": {"cores": 2, "instruments": 200, "days": 1500},
        "echo": {**{k: {**v, "p50_ms": 1.0} for k, v in lat.items()}, "throughput_50": {"rps": 1000.0}},
        "server": {**lat, "throughput_50": {"rps": 900.0 / scale}},
        "cold_feature": [{"server_s": s * scale, "local_s": 2.0, "ratio": s * scale / 2.0} for s in (2.0, 1.8, 4.5)],
        "cold_identical": {"clients": 150, "seconds": 2.1 * scale, "local_s": 2.0, "ok": 150, "tasks_published": 1,
                           "distinct_answers": 1},
        "light_lane": {"idle": {"p50_ms": 10.0, "p90_ms": 12.0, "p99_ms": 15.0, "n": 50},
                       "busy": {"p50_ms": 11.0, "p90_ms": 20.0, "p99_ms": 50.0 * scale, "n": 100, "heavy_requests": 6}},
        "connected_clients": [{"connected": n, "answered": n, "rss_per_client_kb": 20.0, "hot_calendar_p50_ms": 1.0,
                               "cold_feature_s": 2.0} for n in (10, 1000)],
    }


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_each_goal_is_the_figure_over_its_floor_from_the_same_run_and_says_whether_it_is_met():
    table = by_name(goals(results()))
    cold = table["cold feature set, 1 request"]
    assert (cold["figure"], cold["floor"], cold["ratio"], cold["met"]) == (2.0, 2.0, 1.0, True)  # medians
    assert table["cold feature set, 150 identical at once"]["ratio"] == 1.05
    assert table["hot throughput, 50 clients"]["ratio"] == 0.9 and table["hot throughput, 50 clients"]["met"]
    assert table["light p99, both feature workers busy"]["ratio"] == 5.0
    assert table["1000 connected clients answered"]["met"] is True
    assert table["memory per connection (1000 clients)"]["met"] is None  # reported, no goal


def test_a_figure_on_the_wrong_side_of_its_goal_is_not_met():
    assert row("x", 1.31, "ms", 1.0, "echo", 1.3)["met"] is False
    assert row("x", 0.79, "req/s", 1.0, "echo", 0.8, higher_is_better=True)["met"] is False
    assert row("x", None, "ms", 1.0, "echo", 1.3)["met"] is False  # not measured: not met


def test_a_run_that_measured_only_the_hot_requests_has_only_their_goals():
    hot_only = {k: v for k, v in results().items() if k in ("machine", "echo", "server")}
    assert [r["name"] for r in goals(hot_only)] == [f"hot {k} p50, 1 client" for k in
                                                    ("calendar", "instrument",
                                                     "feature")] + ["hot throughput, 50 clients"]


def test_the_comparison_pairs_each_figure_of_two_runs_by_name_and_keeps_ones_only_one_run_has():
    old, new = results(2.0), results(1.0)
    del new["light_lane"]
    pairs = by_name(comparison(old, new))
    assert pairs["cold feature set, 1 request"]["old"] == 4.0 and pairs["cold feature set, 1 request"]["new"] == 2.0
    assert pairs["light p99, both feature workers busy"]["new"] is None
    assert pairs["light p99, both feature workers busy"]["old_met"] is True


def test_report_prints_a_runs_tables_from_its_json_and_compares_it_without_running(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(results(2.0)))
    r = results(1.0)
    r["goals"] = goals(r)
    new.write_text(json.dumps(r))
    assert bench.main(["--report", str(new), "--compare", str(old)]) == 0
    out = capsys.readouterr().out
    assert "8 of 8 goals met" in out and f"compared with {old}" in out


def test_cold_field_sets_are_distinct_rolling_windows_of_5_to_70_days():
    sets = [tuple(cold_fields(k)) for k in range(80)]
    assert len(set(sets)) == 80
    windows = [int(f.rsplit(",", 1)[1].rstrip(")")) for s in sets for f in s]
    assert min(windows) == 5 and max(windows) == 70
    with pytest.raises(ValueError):
        cold_fields(80)


def test_light_requests_are_never_repeated_and_alternate_calendars_and_instrument_lists(tmp_path):
    (tmp_path / "calendars").mkdir()
    (tmp_path / "calendars" / "day.txt").write_text("\n".join(f"2020-01-{d:02d}" for d in range(1, 31)))
    bodies = light_bodies(tmp_path, seed=1)
    drawn = [next(bodies) for _ in range(400)]
    assert [k for k, _ in drawn[:4]] == ["calendar", "instrument", "calendar", "instrument"]
    assert len({(k, b["start_time"], b["end_time"]) for k, b in drawn}) == 400


def test_pct_takes_the_nearest_rank_at_or_above():
    assert pct(list(range(1, 101)), 0.99) == 100 and pct([5.0], 0.5) == 5.0 and np.isnan(pct([], 0.5))


def test_lanes_group_calendars_and_instrument_lists_apart_from_features():
    kinds = [KINDS.index("calendar"), KINDS.index("instrument"), KINDS.index("feature"), KINDS.index("feature")]
    lanes = lane_table(Rows(kinds, [0, 0, 0, 0], [0.001, 0.003, 1.0, 2.0], [0, 0, 0, 1]))
    assert lanes["light"]["count"] == 2 and lanes["light"]["p50"] == 2.0
    assert lanes["feature"] == {"count": 1, "p50": 1000.0, "p90": 1000.0, "p99": 1000.0}


def test_histogram_percentiles_interpolate_inside_a_bucket_like_prometheus():
    buckets = {0.001: 0.0, 0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    q = histogram_quantiles(buckets)
    assert q["p50"] == 10.0 and q["p90"] == pytest.approx(82.0) and q["p99"] == pytest.approx(98.2)
    assert histogram_quantiles({0.1: 0.0, float("inf"): 0.0})["p50"] is None
    assert histogram_quantiles({0.1: 0.0, float("inf"): 4.0})["p50"] == 100.0  # past the largest bound


def test_the_server_view_is_the_histogram_of_the_run_only():
    before = {"calendar": {0.01: 100.0, float("inf"): 100.0}}
    after = {"calendar": {0.01: 100.0, float("inf"): 110.0}, "feature": {0.01: 0.0, float("inf"): 0.0}}
    view = server_view(before, after)
    assert list(view) == ["calendar"] and view["calendar"]["count"] == 10 and view["calendar"]["p50"] == 10.0


def test_an_instrument_list_with_an_expression_filter_counts_in_the_feature_lane_as_the_server_computes_it():
    plain = Request.make("instrument", {"instruments": {"market": "csi300", "filter_pipe": [
        {"filter_type": "NameDFilter", "name_rule_re": "SH.*"}]}, "start_time": None, "end_time": None,
        "freq": "day", "as_list": True})
    filtered = Request.make("instrument", {**plain.body, "instruments": {"market": "csi300", "filter_pipe": [
        {"filter_type": "ExpressionDFilter", "rule_expression": "$close>10"}]}})
    calendar = Request.make("calendar", {"start_time": None, "end_time": None, "freq": "day", "future": False})
    assert (calendar.light, plain.light, filtered.light) == (True, True, False)
    kinds = [KINDS.index(k) for k in ("calendar", "instrument", "instrument")]
    lanes = lane_table(Rows(kinds, [0, 0, 0], [0.001, 0.003, 5.0], [0, 0, 0],
                            [LANES.index("light" if r.light else "feature") for r in (calendar, plain, filtered)]))
    assert lanes["light"]["count"] == 2 and lanes["feature"]["count"] == 1 and lanes["feature"]["p50"] == 5000.0
