"""A short headless Locust run against an embedded server on data with only an ``all`` market in 2012-2015.

The scenarios used to assume csi300/csi100 and dates in 2018-2020 (more than half the requests failed on
other data); now they read the server's calendar and markets first. Needs locust (the ``load`` extra);
no RabbitMQ or Redis (``python -m loadtests --embedded``). About 25 s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# Only looked up, not imported: importing locust monkey-patches this process (gevent).
ROOT = Path(__file__).resolve().parents[2]


def test_a_locust_run_on_a_2012_dataset_with_only_the_all_market_has_no_failure():
    command = [sys.executable, "-m", "loadtests", "--embedded", "--start", "2012-01-02", "--days", "900",
               "--markets", "all", "--instruments", "12", "--users", "8", "--spawn-rate", "8", "--time", "6s"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    print(out)
    assert "markets all" in out and "data 2012-01-02 .. 2015-06-12" in out  # the dataset is what the test says
    assert "qlib load: markets all (12); dates 2012-01-02 .. 2015-06-12 (900 trading days)" in out  # chosen
    assert "qlib load: hot range 2012-03-" in out
    total = re.search(r"^total\s+(\d+)\s+(\d+)\s", out, re.M)
    assert total, out
    requests, failures = map(int, total.groups())
    assert requests > 100 and failures == 0, out
    assert run.returncode == 0, out
