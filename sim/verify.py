"""Checking the server's answers against Qlib computing the same requests locally on the same data.

Runs after the load (or in processes of its own), never alongside it. Local Qlib reads the dataset
directly with no caches, so it never writes into the server's cache directories. A feature answer is a
dataset-cache file name: the verifier reads that file the way pyqlib's ClientDatasetProvider does and
compares it with ``D.features`` over the same instruments and fields, restricted to the same dates.

``D.features`` runs over the request's dates, as a user's local Qlib would, and the values must be identical
(NaN where Qlib has NaN): the server computes a field whose values depend on where evaluation starts (``EMA``,
running sums) from the request's start, as local Qlib does.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .universe import request_id

_VERIFIER: Verifier | None = None


def init_local_qlib(data_dir: str | Path) -> None:
    """Initialise Qlib in this process reading ``data_dir`` locally, with no expression or dataset cache."""
    import qlib

    qlib.init(provider_uri=str(data_dir), region="cn", expression_cache=None, dataset_cache=None,
              kernels=1, logging_level="ERROR")


def _stamps(values: Iterable) -> list[pd.Timestamp]:
    return [pd.Timestamp(v) for v in values]


def compare_frames(got: pd.DataFrame, want: pd.DataFrame) -> str | None:
    """None when ``got`` holds the same rows, columns and values (NaN where ``want`` has NaN) as ``want``; else
    why not."""
    missing = [c for c in want.columns if c not in got.columns]
    if missing:
        return f"columns {missing} missing (got {list(got.columns)})"
    if got.empty and want.empty:
        return None
    got = got.loc[:, list(want.columns)].sort_index()
    want = want.sort_index()
    if len(got) != len(want):
        return f"{len(got)} rows instead of {len(want)}"
    got_keys = list(zip(got.index.get_level_values(0), _stamps(got.index.get_level_values(-1))))
    want_keys = list(zip(want.index.get_level_values(0), _stamps(want.index.get_level_values(-1))))
    if got_keys != want_keys:
        first = next(i for i, (a, b) in enumerate(zip(got_keys, want_keys)) if a != b)
        return f"row {first} is {got_keys[first]} instead of {want_keys[first]}"
    a, b = got.to_numpy(dtype="float64"), want.to_numpy(dtype="float64")
    close = (a == b) | (np.isnan(a) & np.isnan(b))
    if not close.all():
        row, col = map(int, np.argwhere(~close)[0])
        return (f"{int((~close).sum())} values differ, first at {got_keys[row]} {want.columns[col]!r}: "
                f"{a[row, col]!r} instead of {b[row, col]!r}")
    return None


class Verifier:
    """Expected answers per distinct request, computed lazily with local Qlib and cached."""

    def __init__(self, data_dir: str | Path, cache_dir_name: str = "dataset_cache", init: bool = True):
        self.root = Path(data_dir)
        self.cache_dir = self.root / cache_dir_name
        self._expected: dict[str, Any] = {}
        if init:
            init_local_qlib(self.root)

    def expected(self, kind: str, body: dict) -> Any:
        """What local Qlib answers to this request (a list, a dict of spans, or a DataFrame)."""
        return self._cached(kind, body)

    def _cached(self, kind: str, body: dict) -> Any:
        key = request_id(kind, body)
        if key not in self._expected:
            self._expected[key] = getattr(self, f"_{kind}")(copy.deepcopy(body))
        return self._expected[key]

    @staticmethod
    def _calendar(body: dict) -> list[pd.Timestamp]:
        from qlib.data import D

        return list(D.calendar(body.get("start_time"), body.get("end_time"), body.get("freq", "day"),
                               body.get("future", False)))

    @staticmethod
    def _instrument(body: dict):
        from qlib.data import D

        result = D.list_instruments(body["instruments"], body.get("start_time"), body.get("end_time"),
                                    body.get("freq", "day"), body.get("as_list", False))
        if isinstance(result, dict):
            return {code: [tuple(_stamps(span)) for span in spans] for code, spans in result.items()}
        return sorted(result)

    @staticmethod
    def _feature(body: dict) -> pd.DataFrame:
        from qlib.data import D

        return D.features(body["instruments"], body["fields"], body.get("start_time"), body.get("end_time"),
                          body.get("freq", "day"), disk_cache=0)

    def check(self, kind: str, body: dict, result: Any) -> str | None:
        """None when ``result`` is the right answer to the request; otherwise a short reason."""
        try:
            return getattr(self, f"_check_{kind}")(body, result)
        except Exception as exc:  # a malformed answer must read as wrong, not crash the run
            return f"{type(exc).__name__}: {exc}"[:300]

    def _check_calendar(self, body: dict, result: Any) -> str | None:
        want = self.expected("calendar", body)
        if not isinstance(result, list):
            return f"result is a {type(result).__name__}, not a list"
        got = _stamps(result)
        if got != want:
            return f"{len(got)} days instead of {len(want)} ({got[:1]}..{got[-1:]} vs {want[:1]}..{want[-1:]})"
        return None

    def _check_instrument(self, body: dict, result: Any) -> str | None:
        want = self.expected("instrument", body)
        if isinstance(want, list):
            if not isinstance(result, list):
                return f"result is a {type(result).__name__}, not a list"
            return None if sorted(result) == want else f"codes {sorted(set(result) ^ set(want))[:5]} differ"
        if not isinstance(result, dict):
            return f"result is a {type(result).__name__}, not a dict"
        got = {code: [tuple(_stamps(span)) for span in spans] for code, spans in result.items()}
        if set(got) != set(want):
            return f"codes {sorted(set(got) ^ set(want))[:5]} differ"
        wrong = [code for code in want if got[code] != want[code]]
        return f"spans of {wrong[:5]} differ" if wrong else None

    def _check_feature(self, body: dict, result: Any) -> str | None:
        if body.get("disk_cache", 1) == 0:
            return None if result == "" else f"disk_cache=0 answered {str(result)[:60]!r} instead of ''"
        if not isinstance(result, str) or not result or "/" in result or result.startswith("."):
            return f"{str(result)[:60]!r} is not a dataset cache file name"
        path = self.cache_dir / result
        if not path.exists() or not path.with_suffix(".index").exists():
            return f"dataset cache {result} does not exist"
        from qlib.data.cache import DiskDatasetCache

        got = DiskDatasetCache.read_data_from_cache(path, body.get("start_time"), body.get("end_time"), body["fields"])
        return compare_frames(got, self.expected("feature", body))


def _init_pool(data_dir: str, cache_dir_name: str) -> None:
    global _VERIFIER
    _VERIFIER = Verifier(data_dir, cache_dir_name)


def _check_item(item: tuple) -> str | None:
    kind, body, result = item[:3]
    return _VERIFIER.check(kind, body, result)


def verify_answers(data_dir: str | Path, answers: list[tuple], processes: int = 1,
                   cache_dir_name: str = "dataset_cache") -> Iterator[str | None]:
    """Check each (kind, body, result, ...) answer; yield None or the reason it is wrong, in order.

    With ``processes`` > 1 the checks run in a pool of processes (pass answers sorted by request so
    repeated requests land in the same chunk and reuse its expected answer); otherwise in this process.
    """
    answers = list(answers)
    if processes <= 1:
        verifier = Verifier(data_dir, cache_dir_name)
        for kind, body, result, *_ in answers:
            yield verifier.check(kind, body, result)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=_init_pool, initargs=(str(data_dir), cache_dir_name)) as pool:
        yield from pool.imap(_check_item, answers, chunksize=4)
