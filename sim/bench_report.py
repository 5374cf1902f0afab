"""The benchmark's goals table (figure, floor, ratio, goal, met) and the comparison of two runs.

Each goal is a figure of this run beside its floor from the same run (the echo server, local Qlib, the
idle server): the ratio is figure / floor, met when it is on the right side of the goal. A run's JSON
holds its rows under ``goals``; ``--compare OLD.json`` prints each figure and ratio of both runs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from sim.bench_measure import HOT


def row(name: str, figure, unit: str, floor, floor_name: str, goal: Optional[float], higher_is_better=False) -> dict:
    """One line of the goals table; ``goal`` None: reported, no goal."""
    ratio = round(figure / floor, 3) if figure is not None and floor else None
    met = None
    if goal is not None:
        met = ratio is not None and (ratio >= goal if higher_is_better else ratio <= goal)
    return {"name": name, "figure": figure, "unit": unit, "floor": floor, "floor_name": floor_name, "ratio": ratio,
            "goal": None if goal is None else f"{'>=' if higher_is_better else '<='} {goal:g}", "met": met}


def goals(r: dict) -> list[dict]:
    """The goals table of a run's results (rows only for what the run measured)."""
    rows = []
    cold = r.get("cold_feature") or []
    if cold:
        served = statistics.median(c["server_s"] for c in cold)
        local = statistics.median(c["local_s"] for c in cold)
        rows.append(row("cold feature set, 1 request", round(served, 3), "s", round(local, 3), "local Qlib", 1.0))
    same = r.get("cold_identical")
    if same:
        rows.append(row(f"cold feature set, {same['clients']} identical at once", same["seconds"], "s",
                        same["local_s"], "local Qlib", 1.1))
    echo, server = r.get("echo") or {}, r.get("server") or {}
    for kind in HOT:
        if kind in echo and kind in server:
            rows.append(row(f"hot {kind} p50, 1 client", server[kind]["p50_ms"], "ms", echo[kind]["p50_ms"],
                            "echo p50", 1.3))
    if "throughput_50" in echo and "throughput_50" in server:
        rows.append(row("hot throughput, 50 clients", server["throughput_50"]["rps"], "req/s",
                        echo["throughput_50"]["rps"], "echo", 0.8, higher_is_better=True))
    light = r.get("light_lane")
    if light:
        rows.append(row("light p99, both feature workers busy", light["busy"]["p99_ms"], "ms",
                        light["idle"]["p50_ms"], "idle p50", 10.0))
    many = [c for c in r.get("connected_clients") or [] if c["connected"] >= 1000]
    if many:
        c = many[-1]
        rows.append(row(f"{c['connected']} connected clients answered", c["answered"], "clients", c["connected"],
                        "connected", 1.0, higher_is_better=True))
        rows.append(row(f"memory per connection ({c['connected']} clients)", c["rss_per_client_kb"], "KB", 50.0,
                        "issue's 50 KB", None))
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_goals(rows: list[dict]) -> None:
    print("\n== goals (figure beside its floor, same run) ==")
    print(f"{'figure':44}{'value':>12}{'floor':>12} {'(floor is)':<15}{'ratio':>8}{'goal':>9}{'met':>6}")
    for g in rows:
        print(f"{g['name']:44}{_fmt(g['figure']):>9} {g['unit']:<2}{_fmt(g['floor']):>12} {g['floor_name']:<15}"
              f"{_fmt(g['ratio']):>8}{g['goal'] or 'report':>9}{_fmt(g['met']):>6}")
    met = [g["met"] for g in rows if g["met"] is not None]
    print(f"{sum(met)} of {len(met)} goals met")


def comparison(old: dict, new: dict) -> list[dict]:
    """Per goal figure of either run: old and new figure and ratio (None where a run lacks it)."""
    before = {g["name"]: g for g in old.get("goals") or goals(old)}
    after = {g["name"]: g for g in new.get("goals") or goals(new)}
    names = list(after) + [n for n in before if n not in after]
    out = []
    for name in names:
        a, b = before.get(name, {}), after.get(name, {})
        out.append({"name": name, "unit": b.get("unit") or a.get("unit"), "old": a.get("figure"),
                    "new": b.get("figure"), "old_ratio": a.get("ratio"), "new_ratio": b.get("ratio"),
                    "goal": b.get("goal") or a.get("goal"), "old_met": a.get("met"), "new_met": b.get("met")})
    return out


def print_comparison(rows: list[dict], old_name: str) -> None:
    print(f"\n== compared with {old_name} ==")
    print(f"{'figure':44}{'old':>10}{'new':>10} {'unit':<8}{'old ratio':>10}{'new ratio':>10}{'goal':>9}{'met':>9}")
    for c in rows:
        met = f"{_fmt(c['old_met'])}>{_fmt(c['new_met'])}"
        print(f"{c['name']:44}{_fmt(c['old']):>10}{_fmt(c['new']):>10} {c['unit'] or '':<8}{_fmt(c['old_ratio']):>10}"
              f"{_fmt(c['new_ratio']):>10}{c['goal'] or 'report':>9}{met:>9}")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
