"""A dataset made to trip an evaluator up, Qlib initialised on it, and the two ways of computing a field.

Besides the generator's late listings and early delistings, some instruments are suspended (every field
NaN for a run of days), trade flat for weeks (ties, zero variance), have zero volume, a field whose file
starts later than the others, and negative values (``$change``, ``$neg``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qlib_server.datagen import FIELDS, generate_dataset
from qlib_server.engine import features
from qlib_server.worker import storage

DAYS = 260


def _rewrite(path, change) -> None:
    raw = np.fromfile(path, dtype="<f4")
    values = raw[1:].copy()
    change(values)
    np.concatenate([raw[:1], values]).astype("<f4").tofile(path)


@pytest.fixture(scope="session")
def qlib_data(tmp_path_factory):
    import qlib

    root = generate_dataset(tmp_path_factory.mktemp("engine") / "data", instruments=14, days=DAYS, seed=7,
                            markets={"all": 14})
    codes = sorted(p.name for p in (root / "features").iterdir())
    rng = np.random.default_rng(3)
    for i, code in enumerate(codes):
        folder = root / "features" / code
        if i % 3 == 0:  # suspended: every field NaN for a run of days
            a = 20 + 9 * i
            for field in FIELDS:
                _rewrite(folder / f"{field}.day.bin", lambda v, a=a: v.__setitem__(slice(a, a + 12), np.nan))
        if i % 4 == 1:  # flat for weeks: ties and zero variance
            a = 40 + 5 * i
            for field in ("open", "high", "low", "close", "vwap"):
                _rewrite(folder / f"{field}.day.bin", lambda v, a=a: v.__setitem__(slice(a, a + 30), v[a]))
        if i % 5 == 2:  # no volume for a while
            _rewrite(folder / "volume.day.bin", lambda v: v.__setitem__(slice(60, 75), 0.0))
        first = int(np.fromfile(folder / "close.day.bin", dtype="<f4")[0])
        start = first + (5 + i if i % 2 else 0)
        neg = np.round(rng.normal(0, 1, DAYS - start), 1)  # negatives, zeros and ties
        if i == 5:
            neg[10:] = np.nan  # a field that stops early
        np.concatenate([[start], neg]).astype("<f4").tofile(folder / "neg.day.bin")
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR", kernels=1,
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    return root


@pytest.fixture(scope="session")
def codes(qlib_data):
    return sorted(p.name.upper() for p in (qlib_data / "features").iterdir())


def by_engine(names, codes, start_time=None, end_time=None, size=5):
    """Each field of each instrument as the engine computes it: ``{name: {code: pd.Series}}``, and how many
    (field, block) pairs were left to Qlib."""
    start_time, end_time = _window(start_time, end_time)
    before = sum(features.FALLBACKS.values())
    out = {name: {} for name in names}
    for block in features.of_qlib(list(codes), list(names), start_time, end_time, "day", size=size):
        for name, values, present in zip(names, block.values, block.present):
            for i, code in enumerate(block.instruments):
                where = np.flatnonzero(present[i])
                out[name][code] = pd.Series(values[i, where], index=where + block.start)
    return out, sum(features.FALLBACKS.values()) - before


def by_qlib(name, code, start_time=None, end_time=None):
    from qlib.data.cache import H
    from qlib.data.data import ExpressionD

    H.clear()
    return ExpressionD.expression(code, name, *_window(start_time, end_time), "day")


def _window(start_time, end_time):
    """The first and last trading day of ``[start_time, end_time]`` (the whole calendar by default), as
    Qlib's dataset provider passes them on to the expression provider."""
    from qlib.data.data import Cal

    days = Cal.calendar(start_time, end_time, "day")
    return days[0], days[-1]


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float32 values lie between ``a`` and ``b`` (0: the same value; NaN pairs count 0)."""
    def ordered(x):
        i = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    both_nan = np.isnan(a) & np.isnan(b)
    return np.where(both_nan, 0, np.abs(ordered(a) - ordered(b)))


def pytest_terminal_summary(terminalreporter):
    from .test_differential import TABLE

    if not TABLE:
        return
    write = terminalreporter.write_line
    write("")
    write("engine against Qlib, per operator: fields, values compared, values 1 float32 ulp off (the rest identical),"
          " fields left to Qlib")
    for op in sorted(TABLE):
        fields, values, off, left = TABLE[op]
        write(f"  {op:<22} {fields:>5} {values:>10,} {off:>6} {left:>6}")
