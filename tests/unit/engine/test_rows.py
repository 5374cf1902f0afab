"""The kernels that move a block's values: the same arrays, bit for bit, as the NumPy code they replace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qlib_server.engine.kernels import rows


def cut_by_numpy(data, first, stop, lo, hi, width):
    """The engine's cut before the kernel: Qlib's ``series.astype(np.float32).loc[start:end]`` on a block."""
    out = np.full((data.shape[0], width), np.nan, dtype=np.float32)
    with np.errstate(over="ignore"):  # a float64 beyond float32 is inf, here as in the kernel
        out[:, :stop - first] = data[:, first:stop]
    position = np.arange(width)
    where = (position >= (lo - first)[:, None]) & (position < (hi - first)[:, None])
    out[~where] = np.nan
    return out, where


DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.bool_])


@st.composite
def blocks(draw):
    n, columns = draw(st.integers(0, 5)), draw(st.integers(1, 12))
    data = draw(hnp.arrays(draw(DTYPES), (n, columns)))
    first = draw(st.integers(0, columns - 1))
    width = draw(st.integers(1, 12))
    stop = min(first + width, columns)
    lo = np.array([draw(st.integers(0, columns)) for _ in range(n)], dtype=np.int64)
    hi = np.array([draw(st.integers(int(a), columns)) for a in lo], dtype=np.int64)
    return data, first, stop, lo, hi, width


@settings(max_examples=300, deadline=None)
@given(blocks())
def test_a_fields_cut_is_numpys_cast_and_mask_bit_for_bit(block):
    out, where = rows.cut(*block)
    expected, expected_where = cut_by_numpy(*block)
    assert out.dtype == np.float32 and np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(where, expected_where)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=9)), st.data())
def test_the_rows_kept_of_a_block_are_numpys_boolean_index_in_order(values, data):
    keep = data.draw(hnp.arrays(np.bool_, values.shape))
    out = np.full(values.size + 1, 7, dtype=np.float32)
    assert rows.compress(values, keep, out) == keep.sum()
    assert np.array_equal(out[:keep.sum()].view(np.uint32), values[keep].view(np.uint32)) and out[keep.sum()] == 7
