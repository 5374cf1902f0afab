"""Array kernels of the engine: each computes one Qlib/pandas window operation for many series at once.

The contract every kernel keeps:

- ``x`` is a C-contiguous ``float64`` array of shape ``(n, t)``: row ``i`` holds one instrument's series on
  calendar positions. Only ``x[i, lo[i]:hi[i]]`` exists (``lo``, ``hi``: ``int64`` arrays of shape ``(n,)``,
  half-open); that slice is exactly the ``pandas.Series`` Qlib would hold (NaN inside it is a NaN value;
  positions outside it do not exist at all).
- ``window`` > 0 is ``rolling(window, min_periods=1)``; ``window == 0`` is ``expanding(min_periods=1)``.
- The result is a new C-contiguous ``float64`` array of shape ``(n, t)``, NaN outside ``[lo, hi)``, and inside
  bit for bit what the reference (pandas at the pinned version, or Qlib's own code) gives for that slice.
"""
