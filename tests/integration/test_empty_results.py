"""A feature request with no data is answered like any other: the stock pyqlib client reads the empty
frame local Qlib gives, and the simulator's verifier counts the answer as right."""

from __future__ import annotations

import pandas as pd
import pandas.testing as pdt
import pytest
from clients import WireClient, local_qlib, run_pyqlib

pytestmark = pytest.mark.integration

FIELDS = ["$close", "Mean($close, 5)", "$volume/Ref($volume, 1)"]
QUERIES = f"""
from qlib.data.filter import ExpressionDFilter
FIELDS = {FIELDS!r}
CASES = {{
    "unknown codes": (["SH999999", "SZ999998"], None, None),
    "no instrument passes the filter": (
        D.instruments("csi300", filter_pipe=[ExpressionDFilter(rule_expression="$close>1e9")]), "2019-01-02", None),
    "a window before the data starts": (["SH600002", "SZ000001"], "2010-01-04", "2010-12-31"),
}}
result = {{(name, disk_cache): D.features(instruments, FIELDS, start, end, disk_cache=disk_cache)
          for name, (instruments, start, end) in CASES.items() for disk_cache in (0, 1)}}
"""
# Local Qlib answers a window with no trading day before reading anything (object columns, object
# index levels); the client slices the whole-history dataset cache (float32 columns, a datetime level).
CACHE_SLICED = ("a window before the data starts", 1)


def describe(frame: pd.DataFrame) -> str:
    return f"{list(frame.columns)} {frame.dtypes.astype(str).tolist()} {frame.index.names} " \
           f"{[str(level.dtype) for level in frame.index.levels]}"


def test_the_pyqlib_client_reads_empty_feature_results_as_local_qlib_gives_them(server, dataset):
    served, local = run_pyqlib(QUERIES, server.port, dataset), local_qlib(QUERIES, dataset)
    assert served.keys() == local.keys() and len(local) == 6
    for case, want in local.items():
        got = served[case]
        print(f"\n{case}: served {describe(got)}\n{' ' * len(str(case))}  local  {describe(want)}")
        assert want.empty and list(want.columns) == FIELDS
        assert got.empty and list(got.columns) == FIELDS and got.index.names == ["instrument", "datetime"]
        exact = case != CACHE_SLICED
        pdt.assert_frame_equal(got, want, check_dtype=exact, check_index_type=exact, obj=str(case))
    assert server.metric("qlib_server_responses_total", type="feature", status="0") == 6


def test_the_simulators_verifier_counts_an_empty_answer_as_right(server, dataset):
    body = {"instruments": ["SH999999"], "fields": FIELDS, "start_time": "2019-01-02", "end_time": "2019-03-29",
            "freq": "day", "disk_cache": 1}
    with WireClient(server.url) as client:
        answer = client.request("feature", body)
    assert answer["status"] == 0 and (dataset / "dataset_cache" / answer["result"]).is_file(), answer
    verdicts = local_qlib(f"""
from sim.verify import Verifier
verifier, body = Verifier({str(dataset)!r}, init=False), {body!r}
result = [verifier.check("feature", body, {answer["result"]!r}),
          verifier.check("feature", {{**body, "fields": ["$open"]}}, {answer["result"]!r})]
""", dataset)
    assert verdicts[0] is None
    assert "columns" in verdicts[1]
