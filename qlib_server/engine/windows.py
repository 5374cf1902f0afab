"""Qlib's window operators (``Rolling`` and its subclasses, ``Corr`` and ``Cov``) mapped onto the kernels.

Each branch names the Qlib code it stands for. Window 0 is ``expanding``; a float window in (0, 1) is an
exponentially weighted mean with that ``alpha`` (``Rolling`` and ``EMA``); other windows are positive ints.
Qlib's masks on top of a kernel (``Rsquare`` and ``Corr`` set NaN where a rolling std is close to 0) are
applied here, as ``np.isclose`` finds them (:func:`close_to_zero`).
"""

from __future__ import annotations

import importlib

import numpy as np
from qlib.data import ops

from .values import Series, Unsupported, union

_KERNEL_MODULES = ("windows", "moments", "ewm", "pairs", "qlib_windows", "regression")


def kernel(name: str):
    """The kernel function ``name`` from :mod:`qlib_server.engine.kernels`."""
    for module in _KERNEL_MODULES:
        try:
            found = getattr(importlib.import_module(f"{__package__}.kernels.{module}"), name, None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise Unsupported(f"no kernel {name}")


# Qlib classes whose values are Rolling._load_internal's: getattr(series.rolling(N, min_periods=1), e.func)()
_PANDAS_METHOD = {ops.Rolling, ops.Mean, ops.Sum, ops.Std, ops.Var, ops.Skew, ops.Kurt, ops.Max, ops.Min,
                  ops.Med, ops.Count}
_METHOD_KERNEL = {"sum": "rolling_sum", "mean": "rolling_mean", "std": "rolling_std", "var": "rolling_var",
                  "skew": "rolling_skew", "kurt": "rolling_kurt", "max": "rolling_max", "min": "rolling_min",
                  "median": "rolling_median", "count": "rolling_count", "sem": "rolling_sem"}
# Qlib classes with their own _load_internal over one series: rolling(N, min_periods=1).apply(f) or Cython
_OWN_KERNEL = {ops.IdxMax: "rolling_idxmax", ops.IdxMin: "rolling_idxmin", ops.Mad: "rolling_mad",
               ops.WMA: "rolling_wma", ops.Slope: "rolling_slope", ops.Resi: "rolling_resi"}
_CLOSE_TO_ZERO = 2e-05  # Qlib's atol in Rsquare and Corr


def _window(e) -> int:
    n = e.N
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise Unsupported(f"{type(e).__name__} window {n!r}")
    return n


def _is_alpha(n) -> bool:
    return isinstance(n, float) and 0 < n < 1


def compute(evaluator, e) -> Series:
    """The value of window operator ``e`` for the evaluator's block."""
    kind = type(e)
    if kind in _PANDAS_METHOD:
        x = evaluator.series(e.feature)
        if _is_alpha(e.N):
            return _out(x, kernel("ewm_mean")(x.float64(), x.lo, x.hi, float(e.N)))
        window = _window(e)
        if e.func == "rank":  # Rolling(x, N, "rank"): pandas' rank, not a percentile
            return _out(x, kernel("rolling_rank")(x.float64(), x.lo, x.hi, window))
        if e.func not in _METHOD_KERNEL:
            raise Unsupported(f"rolling {e.func}")
        return _out(x, kernel(_METHOD_KERNEL[e.func])(x.float64(), x.lo, x.hi, window))
    if kind is ops.Rank:
        x = evaluator.series(e.feature)
        return _out(x, kernel("rolling_rank_pct")(x.float64(), x.lo, x.hi, _window(e)))
    if kind is ops.Quantile:
        x = evaluator.series(e.feature)
        return _out(x, kernel("rolling_quantile")(x.float64(), x.lo, x.hi, _window(e), float(e.qscore)))
    if kind in _OWN_KERNEL:
        x = evaluator.series(e.feature)
        return _out(x, kernel(_OWN_KERNEL[kind])(x.float64(), x.lo, x.hi, _window(e)))
    if kind is ops.Rsquare:
        x = evaluator.series(e.feature)
        window = _window(e)
        values = kernel("rolling_rsquare")(x.float64(), x.lo, x.hi, window)
        if window != 0:
            values[_flat(evaluator, e.feature, window)] = np.nan
        return _out(x, values)
    if kind is ops.EMA:
        x = evaluator.series(e.feature)
        if _is_alpha(e.N):
            return _out(x, kernel("ewm_mean")(x.float64(), x.lo, x.hi, float(e.N)))
        window = _window(e)
        if window == 0:
            return _out(x, kernel("expanding_ema")(x.float64(), x.lo, x.hi))
        return _out(x, kernel("ewm_mean")(x.float64(), x.lo, x.hi, kernel("ewm_span_alpha")(window)))
    if kind in (ops.Corr, ops.Cov):
        return _pair(evaluator, e)
    raise Unsupported(f"operator {kind.__name__}")


def _pair(evaluator, e) -> Series:
    left, right = evaluator.value(e.feature_left), evaluator.value(e.feature_right)
    if not (isinstance(left, Series) and isinstance(right, Series)):
        raise Unsupported(f"{type(e).__name__} with a constant operand")
    if not left.same_spans(right):
        if type(e) is ops.Corr:  # Qlib's mask combines arrays of two lengths: it raises
            raise Unsupported("Corr of series with different indexes")
        left, right, lo, hi = union(left, right)  # pandas aligns the pair (then NaN on one side is NaN on both)
        left, right = Series(left.data, lo, hi), Series(right.data, lo, hi)
    window = _window(e)
    if window == 0:
        raise Unsupported(f"{type(e).__name__} over an expanding window (Qlib's look-back is -inf)")
    name = "rolling_corr" if type(e) is ops.Corr else "rolling_cov"
    values = kernel(name)(left.float64(), right.float64(), left.lo, left.hi, window)
    if type(e) is ops.Corr:
        values[_flat(evaluator, e.feature_left, window) | _flat(evaluator, e.feature_right, window)] = np.nan
    return _out(left, values)


def _std_key(feature, window: int) -> str:
    """The memo key of ``x.rolling(window, min_periods=1).std()``: Qlib's own for ``Std(x, window)``."""
    return f"Std({feature},{window})"


def shared_keys(e) -> list[str]:
    """Memo keys ``e`` reads besides its operands' (the rolling std behind the masks of Rsquare and Corr)."""
    if type(e) is ops.Rsquare and isinstance(e.N, int) and e.N > 0:
        return [_std_key(e.feature, e.N)]
    if type(e) is ops.Corr and isinstance(e.N, int) and e.N > 0:
        return [_std_key(e.feature_left, e.N), _std_key(e.feature_right, e.N)]
    return []


def _flat(evaluator, feature, window: int) -> np.ndarray:
    """Where Qlib finds ``np.isclose(x.rolling(window, min_periods=1).std(), 0, atol=2e-05)``: that std is
    ``Std(x, window)``'s value, computed once per block (kept under its key, as a field asking it finds it)."""
    key = _std_key(feature, window)
    std = evaluator.memo.get(key)
    if std is None:
        x = evaluator.series(feature)
        std = evaluator.memo[key] = _out(x, kernel("rolling_std")(x.float64(), x.lo, x.hi, window))
    return close_to_zero(std.data)


def close_to_zero(std: np.ndarray) -> np.ndarray:
    """``np.isclose(std, 0, atol=2e-05)``: with 0 as the reference, ``|std - 0| <= atol + rtol * |0|`` is
    ``|std| <= atol`` (NaN and infinities not close, as there), without ``isclose``'s general case's passes."""
    return np.abs(std) <= _CLOSE_TO_ZERO


def _out(x: Series, values: np.ndarray) -> Series:
    return Series(values, x.lo, x.hi)
