"""Tests of the Qlib expression validator: real expressions pass, everything else is refused."""

import ast
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qlib.contrib.data.loader import Alpha158DL, Alpha360DL
from qlib.utils import parse_field

from qlib_server.errors import ConfigError, RequestError
from qlib_server.expressions import check_expression, qlib_operators, start_matters

OPS = qlib_operators()

ALPHA158_FULL_CONFIG = {
    "kbar": {},
    "price": {"windows": [0, 1, 2, 3, 4], "feature": ["OPEN", "HIGH", "LOW", "VWAP", "CLOSE"]},
    "volume": {"windows": [0, 1, 2, 3, 4]},
    "rolling": {},
}


def alpha_expressions():
    """All field expressions of Alpha158 (default and full config) and Alpha360."""
    fields = Alpha158DL.get_feature_config()[0] + Alpha158DL.get_feature_config(ALPHA158_FULL_CONFIG)[0]
    return sorted(set(fields + Alpha360DL.get_feature_config()[0]))


def check(text, **kwargs):
    """Validate with Qlib's own operator set."""
    return check_expression(text, operators=OPS, **kwargs)


def assert_safe_python(text, operators=OPS):
    """Qlib's translation of an accepted text compiles and holds only operator calls, numbers and strings."""
    tree = ast.parse(parse_field(text).lstrip(" \t"), mode="eval")  # eval() strips these, ast.parse does not
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            assert isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name), ast.dump(node)
            assert func.value.id == "Operators" and func.attr in operators
            assert not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)
        elif isinstance(node, ast.Attribute):
            assert isinstance(node.value, ast.Name) and node.value.id == "Operators"
        elif isinstance(node, ast.Name):
            assert node.id == "Operators"
        elif isinstance(node, ast.Constant):
            assert type(node.value) in (int, float, str)
        elif isinstance(node, ast.UnaryOp):
            assert isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant)
        else:
            allowed = (ast.Expression, ast.BinOp, ast.Compare, ast.Load, ast.USub, ast.UAdd, ast.Add, ast.Sub)
            allowed += (ast.Mult, ast.Div, ast.BitAnd, ast.BitOr, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
            assert isinstance(node, allowed), ast.dump(node)
    compile(tree, "<qlib expression>", "eval")


def test_operator_set_matches_qlib():
    assert {"Mean", "Ref", "If", "Corr", "Rolling", "TResample", "PRef", "Feature"} <= OPS
    assert not {"eval", "exec", "__import__", "open", "Operators"} & OPS


def test_custom_operators_are_added_and_must_be_identifiers():
    ops = qlib_operators(["MyOp"])
    assert "MyOp" in ops and OPS < ops
    assert check_expression("MyOp($close, 3)", operators=ops) == "MyOp($close, 3)"
    with pytest.raises(RequestError, match="'MyOp' is not a Qlib operator"):
        check("MyOp($close, 3)")
    for bad in ["os.system", "lambda", "", "Мean", "a b"]:
        with pytest.raises(ConfigError):
            qlib_operators([bad])


def test_alpha158_and_alpha360_expressions_are_accepted_unchanged():
    fields = alpha_expressions()
    assert len(fields) > 500
    for field in fields:
        assert check(field) == field
        assert_safe_python(field)


@pytest.mark.parametrize(
    "text",
    [
        "$close>5",
        "$volume > 1e6 & $close < 100",
        "($close > 5) | ($open <= 2.5E-3)",
        "$close == $open",
        "$close != 0",
        "Ref($close, -1) / $close - 1",
        "Mean($close, 5) / Ref($close, 1) - 1",
        "If($close > $open, 1, -1)",
        "Corr($close, Log($volume + 1), 10)",
        "Quantile($close, 20, 0.8)",
        "EMA($close, 0.5) * -1",
        "$$roewa_q / PRef($$roewa_q, 201902)",
        "P($$roewa_q)",
        "Mask($close, 'sh000300')",
        'ChangeInstrument("SH000300", $close)',
        "ChangeInstrument('^GSPC', Mean($close, 5))",
        "TResample($close, '5min', 'last')",
        "Rolling($close, 5, 'mean')",
        "Feature('close') + PFeature(\"roe\")",
        "\tAbs( $close )  ",
        "00 + 0.5 + .5 + 3. + 1e-12",
    ],
)
def test_real_world_expressions_are_accepted(text):
    assert check(text) == text
    assert_safe_python(text)


HOSTILE = [
    ("__import__('os').system('touch /tmp/x')", "'__import__' is not a Qlib operator (at 0)"),
    ("$close.__class__", "'.'"),
    ("Mean($close, 5).__init__", "'.'"),
    ("[].__class__", "'['"),
    ('"a"', "'\"a\"'"),
    ("lambda: 1", "'lambda'"),
    ("open('/etc/passwd')", "'open'"),
    ("Ref($close, 1)[0]", "'['"),
    ("Mean($close, window=5)", "'window'"),
    ('exec("x")', "'exec'"),
    ("$close; import os", "';'"),
    ("Mean(*[$close])", "'*'"),
    ("Mean(**{'N': 5})", "'**'"),
    ("eval('1')", "'eval'"),
    ("().__class__.__bases__[0].__subclasses__()", "')'"),
    ("$close if 1 else $open", "'if'"),
    ("[x for x in (1,)]", "'['"),
    ("{1: 2}", "'{'"),
    ("os.system('id')", "'os'"),
    ('b"abc"', "'b'"),
    ('f"{1}"', "'f'"),
    ("$close\nimport os", "'\\n'"),
    ("Ref($close, 1)\r\n__import__('os')", "'\\r'"),
    ("Mean($close, 5)**9**9**9", "'**'"),
    ("globals()", "'globals'"),
    ("Mean(x=$close)", "'x'"),
    ("M\u0435an($close, 5)", "'M\u0435an' contains non-ASCII characters"),
    ("\uff45val('1')", "'\uff45val'"),
    ("$clos\u0435 + 1", "'$clos\u0435'"),
    ("$\u0441lose", "'$\u0441lose'"),
    ("Mean.__call__($close, 5)", "'.'"),
    ("Operators.Mean($close, 5)", "'Operators'"),
    ("Feature('../../etc/passwd')", "\"'../../etc/passwd'\""),
    ("Rolling($close, 5, '__class__')", "\"'__class__'\""),
    ("TResample($close, '1d', '__reduce__')", "\"'__reduce__'\""),
    ("ChangeInstrument('../x', $close)", "\"'../x'\""),
    ("Mean($close, '5')", "\"'5'\""),
    ("Mask('sh000300' + 1, $close)", "\"'sh000300'\""),
    ("$close @ $open", "'@'"),
    ("$close % 2", "'%'"),
    ("$close // 2", "'//'"),
    ("~$close", "'~'"),
    ("-$close", "unary '-'"),
    ("$close = 1", "'='"),
    ("($x := 1)", "':'"),
    ("Mean($close,)", "')'"),
    ("Mean()", "')'"),
    ("Mean($close 5)", "'5'"),
    ("Ref($close, 0x10)", "'x10'"),
    ("Ref($close, 1_000)", "'_000'"),
    ("Ref($close, 012)", "'012'"),
    ("Mean($close, 5))", "')'"),
    ("Ref($close, " + "9" * 65 + ")", "longer than 64 characters"),
    ("(Mean($close, 5)", "end of expression"),
    ("Not", "'Not' must be called"),
    ("$", "'$'"),
    ("$1abc", "'$'"),
    ("$$$close", "'$'"),
    ("\\x41", "'\\\\'"),
    ("$close`ls`", "'`'"),
]


@pytest.mark.parametrize(("text", "token"), HOSTILE)
def test_hostile_strings_are_refused_naming_the_token(text, token):
    with pytest.raises(RequestError) as caught:
        check(text)
    message = str(caught.value)
    assert message.startswith("expression refused: ")
    assert token in message, message


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_expressions_are_refused(text):
    with pytest.raises(RequestError, match="empty expression"):
        check(text)


@pytest.mark.parametrize("value", [None, 5, b"$close", ["$close"]])
def test_non_strings_are_refused(value):
    with pytest.raises(RequestError, match="expected a string"):
        check(value)


def test_length_limit_is_enforced_before_parsing():
    text = "+".join(["$close"] * 285) + "+11111"  # exactly 2000 characters
    assert len(text) == 2000 and check(text) == text
    with pytest.raises(RequestError, match="longer than 2000 characters"):
        check(text + "0")
    start = time.perf_counter()
    with pytest.raises(RequestError, match="longer than"):
        check("(" * 10_000_000)
    assert time.perf_counter() - start < 0.5


def test_depth_limit_is_enforced_quickly():
    deep_ok = "Abs(" * 32 + "$close" + ")" * 32
    assert check(deep_ok) == deep_ok
    assert_safe_python(deep_ok)
    start = time.perf_counter()
    for text in ["Abs(" * 100 + "$close" + ")" * 100, "(" * 1900 + "1" + ")" * 99, "Abs(" * 400]:
        with pytest.raises(RequestError, match="nests deeper than 32 levels"):
            check(text)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(RequestError, match="'Abs' nests deeper than 3 levels"):
        check("Abs(Abs(Abs(Abs($close))))", max_depth=3)


def test_depth_limit_setting_is_bounded():
    assert check("Abs(" * 100 + "$close" + ")" * 100, max_depth=100).startswith("Abs(")
    for bad in (0, 101):
        with pytest.raises(ValueError, match="max_depth"):
            check("$close", max_depth=bad)


def test_long_flat_expression_is_checked_in_linear_time():
    text = "-".join(["1"] * 50_000)
    start = time.perf_counter()
    assert check(text, max_length=len(text)) == text
    assert time.perf_counter() - start < 1.0


LANGUAGE_ALPHABET = "$()+-*/<>=!&|~,.'\" \t\n_[]{}:;@%eEx0159MeanRfAbsIfCorclos"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.text(alphabet=LANGUAGE_ALPHABET, max_size=300),
        st.tuples(st.sampled_from(alpha_expressions()), st.integers(0, 200), st.text(LANGUAGE_ALPHABET,
                                                                                     max_size=8)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
        ),
    )
)
def test_random_text_only_ever_raises_request_error(text):
    start = time.perf_counter()
    try:
        result = check(text)
    except RequestError:
        result = None
    assert time.perf_counter() - start < 0.25
    if result is not None:
        assert result == text
        assert_safe_python(text)


FEATURES = st.sampled_from(["$close", "$open", "$high", "$low", "$volume", "$vwap", "$factor", "$$roewa_q"])
NUMBERS = st.one_of(
    st.integers(-1000, 10**9).map(str),
    st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e-12", "1e6", "2.5E+3", ".5", "3.", "0"]),
)
WINDOWS = st.integers(-5, 250).map(str)
BINOPS = st.sampled_from(["+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=", "&", "|"])
SPACE = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def expressions(draw, depth=4):
    """Draw a valid Qlib expression from a small grammar, nested at most `depth` calls deep."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(FEATURES, NUMBERS))
    sub = expressions(depth - 1)
    s = draw(SPACE)
    kind = draw(st.integers(0, 7))
    if kind == 0:
        name = draw(st.sampled_from(["Mean", "Std", "Sum", "Max", "Min", "Ref", "Rank", "Slope", "EMA", "Delta"]))
        return f"{name}({draw(sub)},{s}{draw(WINDOWS)})"
    if kind == 1:
        return f"{draw(st.sampled_from(['Corr', 'Cov']))}({draw(sub)}, {draw(sub)}, {draw(WINDOWS)})"
    if kind == 2:
        return f"If({draw(sub)},{s}{draw(sub)},{s}{draw(sub)})"
    if kind == 3:
        return f"{draw(st.sampled_from(['Abs', 'Log', 'Sign', 'Not', 'P']))}{s}({s}{draw(sub)}{s})"
    if kind == 4:
        return f"{draw(st.sampled_from(['Greater', 'Less', 'Power', 'Add', 'Gt', 'And']))}({draw(sub)}, {draw(sub)})"
    if kind == 5:
        return f"({s}{draw(sub)}{s})"
    if kind == 6:
        return f"Quantile({draw(sub)}, {draw(WINDOWS)}, 0.{draw(st.integers(1, 9))})"
    return f"{draw(sub)}{s}{draw(BINOPS)}{s}{draw(sub)}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions())
def test_generated_valid_expressions_are_accepted_and_parsed_by_qlib(text):
    assert check(text) == text
    assert_safe_python(text)


@pytest.mark.parametrize("text, matters", [
    ("$close", False), ("Ref($close, 1)/$close - 1", False), ("Ref($close, -2)/Ref($close, -1) - 1", False),
    ("Max($high, 10)", False), ("Rank(Ref($close, 1), 10)", False), ("Quantile($close, 10, 0.8)", False),
    ("If($close>$open, Max($high,5), Min($low, 5))", False), ('Rolling($close, 5, "max")', False),
    ("Count($close>$open, 20)", False), ('Feature("close")', False), ("WMA($close, 5) + Mad($close, 5)", False),
    ("Mean($close, 5)", True), ("EMA($close, 12)", True), ("Std($close, 20)/$close", True),
    ("Corr($close, $volume, 10)", True), ("Slope($close, 10)", True), ("Delta($close, 3)", True),
    ("Max($high, 0)", True), ("Ref($close, 0)", True), ("Max($close, Add(1, 2))", True),
    ('Rolling($close, 5, "mean")', True), ("$$roe_q", True), ("Abs(Sum($close, 5))", True),
])
def test_a_field_depends_on_where_evaluation_starts_when_an_operator_carries_state_or_expands(text, matters):
    assert start_matters(check_expression(text, operators=qlib_operators())) is matters
