"""Qlib's data layer on top of the server: what Qlib's own tests exercise (loaders, the Alpha158 and Alpha360
handlers with their processors, datasets and time-series samplers, special and elementwise operators, a
rolling update, a LightGBM model) run once with local Qlib and once through ``qlib_server.client`` against
an embedded server on its defaults, and every result must be the same (``df.equals`` and dtypes).

Each workflow is one script run in two subprocesses (``local_qlib`` and ``run_server_client``); the
client's ``provider_uri`` is an empty directory. Every date range starts mid-calendar, so windowed
fields (Mean, Std, EMA, ...) depend on where the request starts, as they do in Qlib. Qlib's tests
themselves run on generated data through ``nox -s qlib_tests`` (``tests/qlib_suite``).
"""

from __future__ import annotations

import pandas as pd
import pytest
from clients import local_qlib, run_server_client
from test_client import assert_same
from test_embedded import embedded_server

pytestmark = pytest.mark.integration

# the session's dataset: 30 codes on 750 business days from 2018-01-02 (csi300 holds 22 of them)
START, FIT_END, VALID_END, END = "2018-06-13", "2019-03-29", "2019-08-30", "2019-12-31"
SEGMENTS = {"train": (START, FIT_END), "valid": ("2019-04-01", VALID_END), "test": ("2019-09-02", END)}
LABEL = "Ref($close, -2)/Ref($close, -1) - 1"

PRELUDE = f"""
import numpy as np
import pandas as pd
from qlib.data.dataset import DatasetH, TSDatasetH
from qlib.data.dataset.handler import DataHandlerLP
START, FIT_END, VALID_END, END = {START!r}, {FIT_END!r}, {VALID_END!r}, {END!r}
SEGMENTS = {SEGMENTS!r}
LABEL = {LABEL!r}


def segments(dataset):
    '''Every segment of a DatasetH, features and label, as the model sees them (learn) and as inference does.'''
    out = {{}}
    for name in SEGMENTS:
        out[name + "_learn"] = dataset.prepare(name, col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
        out[name + "_infer"] = dataset.prepare(name, col_set="feature", data_key=DataHandlerLP.DK_I)
    return out
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, dataset):
    """Run a script through ``qlib_server.client`` against an embedded server (its defaults, but for the data
    and its port), the client's ``provider_uri`` an empty directory."""
    empty = tmp_path_factory.mktemp("no-data")
    with embedded_server(tmp_path_factory.mktemp("embedded"), dataset) as server:
        yield lambda script: run_server_client(PRELUDE + script, server.port, empty)
    assert list(empty.iterdir()) == []  # the client read nothing from, and wrote nothing to, its data directory


def both(served, dataset, script: str) -> dict:
    """The script's ``result`` from the server, after checking it equals local Qlib's; return local Qlib's."""
    expected = local_qlib(PRELUDE + script, dataset)
    assert_same(served(script), expected)
    return expected


def test_a_data_loader_with_feature_and_label_groups_loads_what_local_qlib_loads(served, dataset):
    result = both(served, dataset, """
from qlib.data.dataset.loader import NestedDataLoader, QlibDataLoader
from qlib.data.dataset.processor import Fillna
groups = {"feature": (["$close/Ref($close, 1) - 1", "Mean($close, 10)/$close", "Std($volume, 20)", "EMA($vwap, 12)",
                       "Corr($close, Log($volume + 1), 10)"], ["RET", "MA10", "VSTD20", "EMA12", "CORR10"]),
          "label": ([LABEL], ["LABEL0"])}
grouped = QlibDataLoader(config=groups).load("csi300", START, END)
nested = NestedDataLoader(dataloader_l=[
    {"class": "qlib.contrib.data.loader.Alpha158DL"},
    {"class": "qlib.contrib.data.loader.Alpha360DL", "kwargs": {"config": {"label": ([LABEL], ["LABEL0"])}}},
]).load(instruments="csi100", start_time="2019-10-08", end_time="2019-11-29")
result = {"grouped": grouped, "grouped_filled": Fillna(fields_group="feature", fill_value=0)(grouped.copy()),
          "nested": nested, "no_swap": QlibDataLoader(config=groups, swap_level=False).load("csi100", START, FIT_END)}
""")
    assert list(result["grouped"].columns.levels[0]) == ["feature", "label"] and len(result["grouped"]) > 2000
    assert result["nested"].shape[1] > 500 and len(result["nested"]) > 100  # a column both loaders name: once
    assert not result["grouped_filled"]["feature"].isna().any().any()


ALPHA158 = """
from qlib.contrib.data.handler import Alpha158
handler = Alpha158(
    instruments="csi300", start_time=START, end_time=END, fit_start_time=START, fit_end_time=FIT_END,
    infer_processors=[{"class": "RobustZScoreNorm", "kwargs": {"fields_group": "feature", "clip_outlier": True}},
                      {"class": "Fillna", "kwargs": {"fields_group": "feature"}}],
    learn_processors=["DropnaLabel", {"class": "CSRankNorm", "kwargs": {"fields_group": "label"}}],
)
dataset = DatasetH(handler, SEGMENTS)
"""


def test_alpha158_with_learn_and_infer_processors_prepares_the_same_segments(served, dataset):
    result = both(served, dataset, ALPHA158 + """
result = {**segments(dataset), "raw": handler.fetch(data_key=DataHandlerLP.DK_R)}
""")
    assert result["raw"].shape[1] == 159 and result["train_learn"].shape[1] == 159
    assert result["train_infer"].shape[1] == 158 and not result["test_infer"].isna().any().any()
    assert len(result["valid_learn"]) > 1000 and len(result["test_learn"]) <= len(result["test_infer"])


def test_alpha360_with_zscore_normalisation_fitted_on_the_train_dates_prepares_the_same_segments(served, dataset):
    result = both(served, dataset, """
from qlib.contrib.data.handler import Alpha360
handler = Alpha360(
    instruments="csi100", start_time=START, end_time=END, fit_start_time=START, fit_end_time=FIT_END,
    infer_processors=[{"class": "ZScoreNorm", "kwargs": {"fields_group": "feature"}},
                      {"class": "Fillna", "kwargs": {"fields_group": "feature"}}],
    learn_processors=["DropnaLabel", {"class": "CSZScoreNorm", "kwargs": {"fields_group": "label"}}],
)
result = segments(DatasetH(handler, SEGMENTS))
""")
    assert result["train_infer"].shape[1] == 360 and len(result["test_infer"]) > 300


def test_a_time_series_dataset_samples_the_same_windows(served, dataset):
    result = both(served, dataset, """
from qlib.contrib.data.handler import Alpha158
handler = Alpha158(
    instruments="csi300", start_time=START, end_time=END, fit_start_time=START, fit_end_time=FIT_END,
    infer_processors=[{"class": "FilterCol", "kwargs": {"col_list": ["RESI5", "WVMA5", "RSQR5", "KLEN", "STD20"]}},
                      {"class": "RobustZScoreNorm", "kwargs": {"fields_group": "feature", "clip_outlier": True}},
                      {"class": "Fillna", "kwargs": {"fields_group": "feature"}}],
    learn_processors=["DropnaLabel", {"class": "CSRankNorm", "kwargs": {"fields_group": "label"}}],
)
ts = TSDatasetH(handler=handler, segments=SEGMENTS, step_len=20)
result = {}
for name in SEGMENTS:
    sampler = ts.prepare(name, col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
    windows = sampler[np.arange(len(sampler))]  # every sample: (samples, 20 days, 5 features + label)
    index = sampler.get_index()
    result[name] = pd.DataFrame(windows.reshape(len(sampler) * 20, -1),
                                index=pd.MultiIndex.from_product([index, range(20)]))
    last = pd.MultiIndex.from_tuples([index[-1]] * 20)  # the last sample, asked by (datetime, instrument)
    result[name + "_by_key"] = pd.DataFrame(sampler[index[-1]], index=last)
""")
    assert result["train"].shape[1] == 6 and len(result["valid"]) > 20 * 1000


def test_special_and_elementwise_operators_over_a_market_give_the_same_frame(served, dataset):
    ret = "$close/Ref($close, 1) - 1"
    market = f"ChangeInstrument('SH600000', {ret})"
    beta = f"Cov({ret}, {market}, 60)/ChangeInstrument('SH600000', Var({ret}, 60))"
    fields = [ret, market, beta, f"{ret} - {beta}*{market}", "Abs($close - Ref($close, 1))",
              "Sign($close - Ref($close, 1))", "Log($volume)", "Power($close, 2)", "Not($close > $open)",
              "If($close > $open, $high, $low)", "Mask($close, 'SZ000001')", "Rank($close, 10)",
              "Quantile($close, 20, 0.8)", "Slope($close, 10)", "Rsquare($close, 10)", "Resi($close, 10)",
              "WMA($close, 10)", "EMA($close, 10)", "IdxMax($high, 15)", "Delta($close, 5)", "Mad($close, 10)",
              "Skew($close, 20)", "Kurt($close, 20)", "Med($close, 9)", "Corr($close, $volume, 20)",
              "Greater($open, $close) - Less($open, $close)", "Count($close > $open, 10)"]
    result = both(served, dataset, f"""
from qlib.data.ops import ChangeInstrument, Feature, Ref, Var, Cov
ret = Feature("close") / Ref(Feature("close"), 1) - 1
market = ChangeInstrument("sh600000", ret)
beta = Cov(ret, market, 60) / ChangeInstrument("sh600000", Var(ret, 60))
result = {{
    "fields": D.features(D.instruments("csi300"), {fields!r}, "2019-02-18", "2019-10-31"),
    "objects": D.features(["SZ000001", "SH600002"], [Feature("close"), market, beta, ret - beta * market],
                          "2018-11-05", "2019-04-30"),
}}
""")
    assert result["fields"].shape[1] == len(fields) and result["fields"].iloc[:, 1].notna().any()


def test_a_rolling_update_of_a_dumped_dataset_gives_the_same_new_data(served, dataset):
    """As Qlib's online update does: the fitted dataset dumped and set up again on later dates (``IT_LS``:
    the processors keep their fitted state); then its fit dates moved and the processors fitted again."""
    result = both(served, dataset, ALPHA158 + """
import pickle
first = segments(dataset)
dataset = pickle.loads(pickle.dumps(dataset))
later = {"test": ("2020-01-02", "2020-03-31")}
dataset.config(handler_kwargs={"start_time": "2019-12-02", "end_time": "2020-03-31"}, segments=later)
dataset.setup_data(handler_kwargs={"init_type": DataHandlerLP.IT_LS})
updated = dataset.prepare("test", col_set="feature", data_key=DataHandlerLP.DK_I)
moved = {"train": ("2018-09-03", "2019-06-28"), "valid": ("2019-07-01", "2019-10-31"),
         "test": ("2019-11-01", "2020-03-31")}
fit = {"fit_start_time": "2018-09-03", "fit_end_time": "2019-06-28"}
dataset.config(handler_kwargs={"start_time": "2018-09-03", "end_time": "2020-03-31", "processor_kwargs": fit},
               segments=moved)
dataset.setup_data(handler_kwargs={"init_type": DataHandlerLP.IT_FIT_SEQ})
result = {"first_test": first["test_infer"], "updated": updated,
          **{"refitted_" + name: dataset.prepare(name, col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
             for name in moved}}
""")
    assert result["updated"].index.get_level_values("datetime").min() == pd.Timestamp("2020-01-02")
    assert result["refitted_train"].index.get_level_values("datetime").min() == pd.Timestamp("2018-09-03")


def test_a_lightgbm_model_trained_on_alpha158_predicts_the_same_scores(served, dataset):
    result = both(served, dataset, ALPHA158 + """
import os, tempfile
from qlib.contrib.model.gbdt import LGBModel
from qlib.workflow import R
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # Qlib records to mlflow's file store (deprecated in mlflow 3)
model = LGBModel(loss="mse", num_leaves=16, max_depth=4, learning_rate=0.1, num_boost_round=40,
                 early_stopping_rounds=10, num_threads=1, seed=7, deterministic=True, verbosity=-1)
home = os.getcwd()
with tempfile.TemporaryDirectory() as runs:
    os.chdir(runs)  # Qlib's recorder makes its lock file under the working directory (the "file:" path made relative)
    try:
        with R.start(experiment_name="workflows", uri="file:" + runs):
            model.fit(dataset)  # the training curve is logged to the recorder
    finally:
        os.chdir(home)
result = {"pred": model.predict(dataset, segment="test").to_frame("score"),
          "importance": model.get_feature_importance().sort_index().to_dict()}
""")
    assert len(result["pred"]) > 1000 and result["pred"]["score"].std() > 0
