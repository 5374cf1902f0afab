"""Compare two recordings of the plugin (:mod:`tests.qlib_suite.plugin`), answer by answer, and tabulate."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


def same(a, b) -> bool:
    """Frames and series: ``equals`` (values, NaN places, index, columns and dtypes); arrays and indexes
    (calendars): equal items of the same dtype; anything else (lists, dicts of spans): ``==``."""
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return type(a) is type(b) and a.equals(b)
    if isinstance(a, (np.ndarray, pd.Index)):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and pd.Index(a.ravel()).equals(pd.Index(b.ravel())))
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError):
        return False


def difference(a, b) -> str:
    """A short account of how ``b`` differs from ``a``."""
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, pd.DataFrame):
        if a.shape != b.shape:
            return f"shape {a.shape} vs {b.shape}"
        if not a.columns.equals(b.columns):
            return f"columns {list(a.columns)[:5]} vs {list(b.columns)[:5]}"
        if not a.index.equals(b.index):
            return "index differs"
        if not a.dtypes.equals(b.dtypes):
            return f"dtypes {dict(a.dtypes.value_counts())} vs {dict(b.dtypes.value_counts())}"
        values_a, values_b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        unequal = ~((values_a == values_b) | (np.isnan(values_a) & np.isnan(values_b)))
        nan_places = int((np.isnan(values_a) != np.isnan(values_b)).sum())
        return f"{int(unequal.sum())} of {unequal.size} values ({nan_places} NaN places)"
    if isinstance(a, (list, dict)) and len(a) != len(b):
        return f"{len(a)} vs {len(b)} items"
    return "values differ"


def load(directory: Path) -> dict:
    recording = json.loads((directory / "recording.json").read_text())
    recording["dir"] = directory
    return recording


def answer(recording: dict, entry: dict):
    with open(recording["dir"] / entry["file"], "rb") as f:
        return pickle.load(f)


@dataclass
class Row:
    test: str
    local: str
    server: str
    compared: int = 0
    differing: int = 0
    notes: list[str] = field(default_factory=list)
    reason: str = ""  # why the test cannot run through a server (when it cannot)


def compare(local_dir: Path, server_dir: Path, cannot: dict[str, str]) -> list[Row]:
    """One row per test of either run: outcomes, answers compared (both runs gave one at that place)
    and how many of them differ (an error on one side and a value on the other counts, as does an answer
    one run gave and the other did not)."""
    local, server = load(local_dir), load(server_dir)

    def by_test(recording):
        out: dict[str, list[dict]] = {}
        for entry in recording["entries"]:
            out.setdefault(entry["test"], []).append(entry)
        return out

    local_answers, server_answers = by_test(local), by_test(server)
    tests = list(dict.fromkeys([*local["outcomes"], *server["outcomes"], *local_answers, *server_answers]))
    rows = []
    for test in tests:
        lo = local["outcomes"].get(test, {"outcome": "not run", "message": ""})
        so = server["outcomes"].get(test, {"outcome": "not run", "message": ""})
        row = Row(test, lo["outcome"], so["outcome"], reason=reason_for(test, cannot))
        for side, outcome in (("local", lo), ("server", so)):
            if outcome["outcome"] not in ("passed", "not run") and outcome["message"]:
                row.notes.append(f"{side}: {outcome['message']}")
        la, sa = local_answers.get(test, []), server_answers.get(test, [])
        for i, (le, se) in enumerate(zip(la, sa)):
            row.compared += 1
            where = f"answer {i} {le['call']}({le['args'][:120]})"
            if le["call"] != se["call"] or le["args"] != se["args"]:
                row.differing += 1
                row.notes.append(f"{where}: the server run asked {se['call']}({se['args'][:120]})")
            elif le["error"] or se["error"]:
                if bool(le["error"]) != bool(se["error"]):
                    row.differing += 1
                    row.notes.append(f"{where}: local {le['error'] or 'answered'}; server {se['error'] or 'answered'}")
            else:
                a, b = answer(local, le), answer(server, se)
                if not same(a, b):
                    row.differing += 1
                    row.notes.append(f"{where}: {difference(a, b)}")
        if len(la) != len(sa):
            row.differing += abs(len(la) - len(sa))
            row.notes.append(f"answers: {len(la)} local, {len(sa)} server")
        rows.append(row)
    return rows


def reason_for(test: str, cannot: dict[str, str]) -> str:
    return next((why for prefix, why in cannot.items() if test.startswith(prefix)), "")


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table, then the notes (failure messages, differences, reasons)."""
    lines = ["| Qlib test | local | server | answers compared | answers differing |",
             "| --- | --- | --- | ---: | ---: |"]
    for row in rows:
        mark = " (no server: see below)" if row.reason else ""
        lines.append(f"| {row.test}{mark} | {row.local} | {row.server} | {row.compared} | {row.differing} |")
    notes = [row for row in rows if row.notes or row.reason]
    if notes:
        lines.append("")
    for row in notes:
        lines.append(f"- {row.test}")
        if row.reason:
            lines.append(f"  - cannot run through a server: {row.reason}")
        lines += [f"  - {note}" for note in row.notes[:6]]
        if len(row.notes) > 6:
            lines.append(f"  - ... and {len(row.notes) - 6} more")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> bool:
    """True when every test that can run through a server gave equal answers and ended as locally."""
    return all(row.reason or (row.differing == 0 and row.local == row.server) for row in rows)
