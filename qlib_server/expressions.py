"""Strict validation of client-supplied Qlib expressions before Qlib turns them into Python and evals them.

Qlib rewrites a field string with regular expressions (`qlib.utils.parse_field`) and passes the result to `eval`,
so anything outside its expression language is code execution. `check_expression` accepts only that language:
`$name` / `$$name` features, numbers, calls of registered operators, the infix operators Qlib's `Expression`
overloads (+ - * / < <= > >= == != & |), parentheses, spaces and tabs. Everything else is refused with a RequestError.
"""

from __future__ import annotations

import functools
import keyword
import re
from collections.abc import Iterable

from .errors import ConfigError, RequestError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(
    r"""(?P<space>[ \t]+)
    |(?P<feature>\$\$?[^\W\d]\w*)
    |(?P<number>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)
    |(?P<name>[^\W\d]\w*)
    |(?P<string>'[^'\n]*'|"[^"\n]*")
    |(?P<refused>\*\*|~|//)
    |(?P<op><=|>=|==|!=|[-+*/<>&|])
    |(?P<punct>[(),])
    |(?P<bad>.)""",
    re.VERBOSE | re.DOTALL,
)
_ADVICE = {"**": "use Power(a, b)", "~": "use Not(x)", "//": "use Div(a, b)"}
_INSTRUMENT = re.compile(r"[A-Za-z0-9_^][A-Za-z0-9_.^-]{0,63}")
_FREQ = re.compile(r"[0-9]{0,4}[A-Za-z]{1,8}(?:-[A-Za-z]{1,4})?")
_ROLLING_FUNCS = re.compile(r"count|sum|mean|median|var|std|min|max|skew|kurt|sem|rank")
_RESAMPLE_FUNCS = re.compile(r"first|last|count|sum|prod|mean|median|var|std|min|max")
# The only registered operators with string parameters: operator -> {argument index: allowed literal}.
_STRING_ARGS = {
    "ChangeInstrument": {0: _INSTRUMENT},
    "Mask": {1: _INSTRUMENT},
    "Rolling": {2: _ROLLING_FUNCS},
    "TResample": {1: _FREQ, 2: _RESAMPLE_FUNCS},
    "Feature": {0: _NAME},
    "PFeature": {0: _NAME},
}


def qlib_operators(custom_ops: Iterable[str] = ()) -> frozenset[str]:
    """Names of the operators Qlib registers (qlib.data.ops.OpsList class names) plus configured custom ones."""
    from qlib.data.ops import OpsList
    from qlib.data.pit import P, PRef

    names = {op.__name__ for op in OpsList} | {P.__name__, PRef.__name__}
    for name in custom_ops:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or keyword.iskeyword(name):
            raise ConfigError(f"custom operator name {name!r} is not a plain identifier")
        names.add(name)
    return frozenset(names)


def _refuse(detail: str, pos: int | None = None) -> RequestError:
    """Build the RequestError for a refused expression."""
    where = "" if pos is None else f" (at {pos})"
    return RequestError(f"expression refused: {detail}{where}")


def _show(text: str) -> str:
    """Quote a token for an error message, shortened when long."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


class _Parser:
    """Recursive-descent checker over the token list; depth is checked before every recursion."""

    def __init__(self, text: str, operators: frozenset[str], max_depth: int):
        # every alternative of _TOKEN is a named group: lastgroup is never None
        self.tokens = [(m.lastgroup or "bad", m.group(), m.start()) for m in _TOKEN.finditer(text)
                       if m.lastgroup != "space"]
        self.tokens.append(("end", "", len(text)))
        self.i = 0
        self.operators = operators
        self.max_depth = max_depth

    def peek(self) -> tuple[str, str, int]:
        """Return the current token, refusing it when the tokenizer could not classify it."""
        kind, value, pos = self.tokens[self.i]
        if kind == "bad":
            raise _refuse(f"unexpected character {_show(value)}", pos)
        if kind in ("name", "feature") and not value.isascii():
            raise _refuse(f"{_show(value)} contains non-ASCII characters", pos)
        if kind == "refused":
            raise _refuse(f"{_show(value)} is not supported; {_ADVICE[value]}", pos)
        return kind, value, pos

    def unexpected(self) -> RequestError:
        """Refuse the current token as out of place."""
        kind, value, pos = self.peek()
        if kind == "end":
            return _refuse("unexpected end of expression", pos)
        if kind == "name" and value not in self.operators:
            return _refuse(f"{_show(value)} is not a Qlib operator", pos)
        if kind == "string":
            return _refuse(f"string literal {_show(value)} is not allowed here", pos)
        return _refuse(f"unexpected {_show(value)}", pos)

    def expect(self, value: str) -> None:
        """Consume the punctuation `value` or refuse the current token."""
        if self.peek()[1] != value:
            raise self.unexpected()
        self.i += 1

    def expression(self, depth: int) -> None:
        """Check `term (binary-operator term)*`."""
        self.term(depth)
        while self.peek()[0] == "op":
            self.i += 1
            self.term(depth)

    def term(self, depth: int) -> None:
        """Check a feature, a signed number, an operator call or a parenthesised expression."""
        kind, value, pos = self.peek()
        if kind == "op" and value in ("+", "-"):
            self.i += 1
            if self.peek()[0] != "number":
                raise _refuse(f"unary {_show(value)} is only allowed before a number", pos)
            kind, value, pos = self.peek()
        if kind == "number":
            if len(value) > 1 and value.isdigit() and value[0] == "0" and value.strip("0"):
                raise _refuse(f"number {_show(value)} has leading zeros", pos)
            if len(value) > 64:
                raise _refuse(f"number {_show(value)} is longer than 64 characters", pos)
            self.i += 1
        elif kind == "feature":
            self.i += 1
        elif kind == "punct" and value == "(":
            self.nest(depth, value, pos)
            self.i += 1
            self.expression(depth + 1)
            self.expect(")")
        elif kind == "name" and value in self.operators:
            self.i += 1
            if self.peek()[1] != "(":
                raise _refuse(f"operator {_show(value)} must be called with arguments", pos)
            self.call(value, depth, pos)
        else:
            raise self.unexpected()

    def nest(self, depth: int, token: str, pos: int) -> None:
        """Refuse nesting beyond the limit before descending."""
        if depth + 1 > self.max_depth:
            raise _refuse(f"{_show(token)} nests deeper than {self.max_depth} levels (the server's "
                          "max_expression_depth)", pos)

    def call(self, name: str, depth: int, pos: int) -> None:
        """Check `Name(arg, ...)`: positional arguments only, none empty, strings only where Qlib takes them."""
        self.nest(depth, name, pos)
        self.i += 1
        string_args = _STRING_ARGS.get(name, {})
        index = 0
        while True:
            kind, value, at = self.peek()
            if kind == "string":
                allowed = string_args.get(index)
                if allowed is None or not allowed.fullmatch(value[1:-1]):
                    raise _refuse(f"string literal {_show(value)} is not allowed as argument {index + 1} of {name}", at)
                self.i += 1
            else:
                self.expression(depth + 1)
            if self.peek()[1] == ")":
                self.i += 1
                return
            self.expect(",")
            index += 1


def check_expression(text: str, *, operators: frozenset[str], max_length: int = 2000, max_depth: int = 32) -> str:
    """Return `text` unchanged when it is a Qlib expression; raise qlib_server.errors.RequestError otherwise."""
    if not 1 <= max_depth <= 100:
        raise ValueError("max_depth must be between 1 and 100 (Python refuses deeper nesting anyway)")
    if not isinstance(text, str):
        raise _refuse(f"expected a string, got {type(text).__name__}")
    if len(text) > max_length:
        raise _refuse(f"longer than {max_length} characters (got {len(text)}; the server's max_expression_length)")
    if not text.strip(" \t"):
        raise _refuse("empty expression")
    parser = _Parser(text, operators, max_depth)
    parser.expression(0)
    if parser.peek()[0] != "end":
        raise parser.unexpected()
    return text


# -- where evaluation starts ------------------------------------------------------------------------

# Qlib evaluates a field from the request's first day less the field's look-back. Most operators give the same
# values wherever that is; these do only when their window (the argument at this index) is a literal other than
# 0: a window of 0 is expanding (``Ref``/``Delta`` of 0 take the first day loaded), and ``Delta`` reads one day
# more than its look-back counts (NaN on a window's first day).
_SAME_WHEREVER = frozenset({"Feature", "Abs", "Sign", "Log", "Power", "Not", "Add", "Sub", "Mul", "Div", "Greater",
                            "Less", "Gt", "Ge", "Lt", "Le", "Eq", "Ne", "And", "Or", "If", "Mask", "ChangeInstrument"})
_EXACT_WINDOWS = {"Ref": 1, "Max": 1, "Min": 1, "IdxMax": 1, "IdxMin": 1, "Quantile": 1, "Med": 1, "Mad": 1,
                  "Rank": 1, "Count": 1, "WMA": 1, "Rolling": 1}
_EXACT_ROLLING = frozenset({"count", "median", "min", "max", "rank"})


def _arguments(tokens: list, at: int) -> list[list[str]]:
    """The arguments (their token texts) of the call whose ``(`` is ``tokens[at]``."""
    args: list[list[str]] = []
    current: list[str] = []
    depth = 0
    for kind, value in tokens[at + 1:]:
        if value in ("(", ")", ",") and kind == "punct":
            if value == ")" and depth == 0:
                return [*args, current]
            if value == "," and depth == 0:
                args.append(current)
                current = []
                continue
            depth += 1 if value == "(" else -1 if value == ")" else 0
        current.append(value)
    return [*args, current]


@functools.lru_cache(maxsize=1 << 16)  # asked for every field of every feature request: fields repeat
def start_matters(text: str) -> bool:
    """Whether a (checked) expression's values may depend on the day Qlib starts evaluating it: running windows
    (pandas' compensated sums, variances, Qlib's regressions, ``Corr``/``Cov``: their rounding), ``EMA``,
    expanding windows, ``Delta``, point-in-time fields and operators, custom operators, ``TResample``. A window
    starting mid-calendar of such a field is not the whole history's values cut to it."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text) if m.lastgroup != "space"]
    for i, (kind, value) in enumerate(tokens):
        if kind == "feature" and value.startswith("$$"):
            return True
        if kind != "name" or i + 1 == len(tokens) or tokens[i + 1][1] != "(" or value in _SAME_WHEREVER:
            continue
        if value not in _EXACT_WINDOWS:
            return True
        args = _arguments(tokens, i + 1)
        window = "".join(args[_EXACT_WINDOWS[value]]) if len(args) > _EXACT_WINDOWS[value] else ""
        if not re.fullmatch(r"[-+]?[0-9]+", window) or int(window) == 0:
            return True
        if value == "Rolling" and (len(args) < 3 or "".join(args[2]).strip("'\"") not in _EXACT_ROLLING):
            return True
    return False
