"""Qlib's expression language evaluated over many instruments at once, with Qlib's values.

``features`` computes a request's fields by blocks of instruments; ``evaluate`` is the operator-by-operator
evaluator; ``windows`` maps Qlib's window operators onto the numba ``kernels``; ``values`` holds the block of
series passed between operators.
"""

from __future__ import annotations

#: one field per kernel and per kind of operand: evaluating them loads (or compiles) every kernel
WARM_FIELDS = (
    "Mean($x, 3)", "Sum($x, 0)", "Std($x, 3)", "Var($x, 3)", "Skew($x, 3)", "Kurt($x, 5)", "Max($x, 3)",
    "Min($x, 3)", "Med($x, 3)", "Count($x, 3)", "Rolling($x, 3, 'sem')", "Rolling($x, 4, 'rank')", "Rank($x, 3)",
    "Quantile($x, 3, 0.5)", "IdxMax($x, 3)", "IdxMin($x, 3)", "Mad($x, 3)", "WMA($x, 3)", "EMA($x, 3)",
    "EMA($x, 0)", "Mean($x, 0.5)", "Slope($x, 3)", "Rsquare($x, 3)", "Resi($x, 3)", "Corr($x, $x * 2, 3)",
    "Cov($x, $x * 2, 3)",
)


def warm() -> None:
    """Load every kernel before a request needs one (Qlib must be initialised): numba compiles a kernel on its
    first call ever and keeps the machine code on disk, so a worker pays that when it starts, not on a request.
    Workers starting together take turns (a file lock): the first compiles, the others load what it wrote."""
    import fcntl
    import logging
    import os
    import tempfile

    import numpy as np
    from qlib.data.data import ExpressionD

    from .evaluate import Evaluator

    raw = np.concatenate([[0], np.linspace(1, 2, 8)]).astype("<f4")
    evaluator = Evaluator(["WARM"], 0, 7, lambda instrument, field: raw)
    lock = os.path.join(tempfile.gettempdir(), f"qlib-server-kernels-{os.getuid()}.lock")
    with open(lock, "a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        logging.disable(logging.WARNING)  # Qlib warns about the warm-up's own expanding windows: no user asked
        try:
            for field in WARM_FIELDS:
                evaluator.series(ExpressionD.get_expression_instance(field))
            _warm_extension(raw)
            _warm_rows()
        finally:
            logging.disable(logging.NOTSET)


def _warm_rows() -> None:
    """The kernels that cut a field to a request's days (for each kind of values a field holds: Qlib's float32
    arithmetic, float64 windows, booleans of comparisons) and gather the rows of a block."""
    import numpy as np

    from .kernels import rows

    spans = np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)
    for dtype in (np.float32, np.float64, np.bool_):
        rows.cut(np.zeros((1, 2), dtype=dtype), 0, 2, *spans, 2)
    values = np.zeros((1, 2), dtype=np.float32)
    rows.compress(values, np.ones((1, 2), dtype=bool), np.empty(2, dtype=np.float32))


def _warm_extension(raw) -> None:
    """The resumable kernels, as a checkpointed computation and its extension by two days call them."""
    from qlib.data.data import ExpressionD

    from .checkpoint import Checkpoint
    from .features import blocks, extend_blocks

    def prefix(end):
        return lambda instrument, field: raw[:end + 2]

    def by_qlib(instrument, name):
        raise RuntimeError(f"warming up: {name} left to Qlib")

    names = list(WARM_FIELDS)
    computed = list(blocks(["WARM"], names, 0, 5, expression_of=ExpressionD.get_expression_instance,
                           extent_of=lambda e: (0, 5 + int(e.get_extended_window_size()[1])), read=prefix(5),
                           by_qlib=by_qlib, threads=1, checkpoint=True))
    saved = Checkpoint(names, 0, 5, [b.checkpoint for b in computed])
    list(extend_blocks(saved, 7, expression_of=ExpressionD.get_expression_instance, read=prefix(7)))
