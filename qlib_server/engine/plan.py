"""What of an evaluation survives appending days to the data, node by node (for :mod:`.incremental`).

Positions are those of an :class:`~.evaluate.Evaluator` (calendar position minus its start). Appending days
after the last day ``T`` leaves every feature's values and index entries before ``F0 = T + 1`` as they were.
A node whose value at ``p`` reads features up to ``p + ahead`` (``ahead``: the look-ahead of the ``Ref(x, -n)``
/ ``Delta(x, -n)`` inside it, as Qlib's ``get_extended_window_size`` counts it) is therefore *frozen* before
``frozen = F0 - ahead``: values and index entries there never change, so an extension recomputes each node from
its frozen point on, with the running state a window carried to that point.

Each node also has a *base*: the first position an extension needs of it, because a consumer reads back from
its own frozen point (a window's tail, a lag's shift) or because the node is a field whose changed rows start
there. An extension computes elementwise nodes, shifts and features (read from the files again) from their
base, and windows from their frozen point, taking the values between base and frozen point from the
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlib.data import base, ops

from . import evaluate, windows
from .kernels.resumable import tail as kernel_tail
from .values import Unsupported


@dataclass
class Window:
    """How a window node is computed: a resumable kernel (``family`` in :data:`.kernels.resumable.STATE`) or a
    kernel whose value depends only on the window's contents (``family == "content"``)."""

    family: str
    kernel: str  # the resumable kernel (stateful families) or the one-shot kernel (content)
    window: int  # 0: expanding
    param: float | None = None  # ewm alpha, quantile q
    operands: tuple = ()
    masks: tuple = ()  # Std(operand, N) expressions whose ~0 values Qlib sets NaN (Rsquare, Corr)

    def tail(self) -> int | None:
        """Input positions before the frozen point the computation reads (None: the whole series)."""
        if self.family != "content":
            return kernel_tail(self.family, self.window)
        if self.window == 0:
            return None
        return self.window - 1


@dataclass
class Node:
    key: str
    expression: Any
    kind: str  # feature, unary, binary, if, ref, delta, first, window
    inputs: tuple  # operand expressions (window masks included)
    ahead: int
    frozen: int = 0
    base: int = 0
    window: Window | None = None
    n: int = 0  # Ref / Delta shift
    needs: list = field(default_factory=list)


def _int(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise Unsupported(f"{what} by {n!r}")
    return n


def window_of(e) -> Window:
    """The computation of window operator ``e``: the dispatch of :func:`.windows.compute`, kernel by kernel."""
    kind = type(e)
    if kind in windows._PANDAS_METHOD or kind is ops.EMA:
        if windows._is_alpha(e.N):
            return Window("ewm", "resume_ewm", 0, float(e.N), (e.feature,))
    if kind in windows._PANDAS_METHOD:
        n = windows._window(e)
        if e.func == "rank":
            return Window("content", "rolling_rank", n, None, (e.feature,))
        family = {"sum": "sum", "mean": "sum", "std": "var", "var": "var", "sem": "var", "skew": "moments",
                  "kurt": "moments"}.get(e.func)
        if family is not None:
            return Window(family, f"resume_{e.func}", n, None, (e.feature,))
        if e.func not in windows._METHOD_KERNEL:
            raise Unsupported(f"rolling {e.func}")
        return Window("content", windows._METHOD_KERNEL[e.func], n, None, (e.feature,))
    if kind is ops.Rank:
        return Window("content", "rolling_rank_pct", windows._window(e), None, (e.feature,))
    if kind is ops.Quantile:
        return Window("content", "rolling_quantile", windows._window(e), float(e.qscore), (e.feature,))
    if kind in (ops.Slope, ops.Resi, ops.Rsquare):
        n = windows._window(e)
        masks = (ops.Std(e.feature, n),) if kind is ops.Rsquare and n != 0 else ()
        return Window("regression", f"resume_{kind.__name__.lower()}", n, None, (e.feature,), masks)
    if kind in windows._OWN_KERNEL:
        return Window("content", windows._OWN_KERNEL[kind], windows._window(e), None, (e.feature,))
    if kind is ops.EMA:
        n = windows._window(e)
        if n == 0:
            return Window("content", "expanding_ema", 0, None, (e.feature,))
        from .kernels.ewm import ewm_span_alpha

        return Window("ewm", "resume_ewm", 0, ewm_span_alpha(n), (e.feature,))
    if kind in (ops.Corr, ops.Cov):
        n = windows._window(e)
        if n == 0:
            raise Unsupported(f"{kind.__name__} over an expanding window (Qlib's look-back is -inf)")
        operands = (e.feature_left, e.feature_right)
        masks = tuple(ops.Std(o, n) for o in operands if isinstance(o, base.Expression)) if kind is ops.Corr else ()
        return Window("pair", f"resume_{kind.__name__.lower()}", n, None, operands, masks)
    raise Unsupported(f"operator {kind.__name__} (not extended incrementally)")


def _node(e, key: str) -> Node:
    kind = type(e)
    if kind is base.Feature:
        return Node(key, e, "feature", (), 0)
    if kind in evaluate._UNARY:
        return Node(key, e, "unary", (e.feature,), 0)
    if kind in evaluate._BINARY:
        return Node(key, e, "binary", (e.feature_left, e.feature_right), 0)
    if kind is ops.If:
        return Node(key, e, "if", (e.condition, e.feature_left, e.feature_right), 0)
    if kind in (ops.Ref, ops.Delta):
        n = _int(e.N, kind.__name__)
        return Node(key, e, ("ref" if kind is ops.Ref else "delta") if n else "first", (e.feature,), 0, n=n)
    w = window_of(e)
    return Node(key, e, "window", tuple(w.operands) + tuple(w.masks), 0, window=w)


@dataclass
class Plan:
    """The nodes of the fields evaluated by one evaluator, operands before their consumers."""

    nodes: dict
    order: list
    roots: list
    f0: int
    ids: dict = field(default_factory=dict)  # id(expression) -> key, for the expressions planned

    def key(self, expression) -> str:
        """``str(expression)``, without formatting it again for an expression of the plan."""
        found = self.ids.get(id(expression))
        return found if found is not None else str(expression)


def plan(expressions: list, f0: int, out_start: int) -> Plan:
    """The plan of ``expressions`` (one evaluator's fields) whose data end before position ``f0``, the fields'
    changed rows wanted from ``out_start`` on. Raises :class:`Unsupported` for what is not extended."""
    nodes: dict = {}
    order: list = []
    ids: dict = {}

    def visit(e) -> Node | None:
        if not isinstance(e, base.Expression):
            return None
        key = ids.get(id(e))
        if key is None:
            key = ids[id(e)] = str(e)
        if key in nodes:
            return nodes[key]
        if type(e) in (ops.ChangeInstrument, ops.Mask):
            raise Unsupported(f"{type(e).__name__} (another instrument's series)")
        node = _node(e, key)
        nodes[key] = node  # Qlib's memo: one node per str
        ahead = 0
        for operand in node.inputs:
            child = visit(operand)
            if child is not None:
                ahead = max(ahead, child.ahead)
                ids[id(operand)] = child.key
        if node.kind in ("ref", "delta") and node.n < 0:
            ahead += -node.n
        node.ahead = ahead
        node.frozen = max(0, f0 - ahead)
        order.append(key)
        return node

    roots = []
    for e in expressions:
        root = visit(e)
        if root is None:
            raise Unsupported(f"{e!r} is a constant")
        roots.append(root.key)
        root.needs.append(out_start)
    for key in reversed(order):  # consumers before operands
        node = nodes[key]
        if not node.needs:
            raise Unsupported(f"{key} is read by nothing")  # cannot happen: every node hangs off a root
        node.base = max(0, min(node.needs))
        if node.kind == "window":
            node.base = min(node.base, node.frozen)
            w = node.window
            reach = w.tail()
            for operand in w.operands:
                if isinstance(operand, base.Expression):
                    nodes[ids[id(operand)]].needs.append(0 if reach is None else node.frozen - reach)
            for mask in w.masks:
                nodes[ids[id(mask)]].needs.append(node.frozen)
            continue
        for operand in node.inputs:
            if isinstance(operand, base.Expression):
                need = node.base
                if node.kind in ("ref", "delta"):
                    need = node.base - node.n if node.kind == "ref" else min(node.base, node.base - node.n)
                nodes[ids[id(operand)]].needs.append(need)
    return Plan(nodes, order, roots, f0, ids)


def look_ahead(expressions: list) -> list:
    """How many positions past ``p`` each expression's value at ``p`` reads (Unsupported as :func:`plan`)."""
    planned = plan(expressions, 0, 0)
    return [planned.nodes[key].ahead for key in planned.roots]
