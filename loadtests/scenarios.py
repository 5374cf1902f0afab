"""Locust scenarios against a Qlib-Server: ``locust -f loadtests/ --headless -H http://HOST:PORT [HotUser ...]``.

- HotUser: the same calendar, instrument list and small feature set again and again (cache and dedup hits).
- ColdUser: a feature set nobody asked for before on every request (a fresh computation each time).
- MixUser: overlapping requests, drawn zipf-like from a universe of about 100.

Without class names on the command line Locust runs all three by their weights.

Before the first user starts, the run reads the server's calendar and markets over the same protocol
(see :mod:`loadtests._profile`) and prints what it chose (markets, dates, fields); every request is built
from them. Options (each also an environment variable): ``--qlib-markets`` / ``QLIB_LOAD_MARKETS`` (e.g.
``all,sp500``: use exactly these; default: probe all, csi300, csi100, csi500, sp500, nasdaq100),
``--qlib-start`` / ``QLIB_LOAD_START`` and ``--qlib-end`` / ``QLIB_LOAD_END`` (cut the calendar),
``--qlib-fields`` / ``QLIB_LOAD_FIELDS`` (the base fields, default Qlib's ``$open .. $vwap``).
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import gevent
from locust import between, events, task
from locust.runners import MasterRunner

try:  # imported as part of the loadtests package
    from ._profile import discover
    from ._socketio_user import QlibSocketIOUser
    from ._workload import Workload, ZipfChooser
except ImportError:  # loaded by locust as a top-level locustfile, with this directory on sys.path
    from _profile import discover
    from _socketio_user import QlibSocketIOUser
    from _workload import Workload, ZipfChooser

#: the requests of this run, built from the server's data once before the first user starts
WORKLOAD: Optional[Workload] = None
MIX: Optional[ZipfChooser] = None


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("Qlib-Server data", "what the requests ask for (default: read from the server)")
    group.add_argument("--qlib-markets", env_var="QLIB_LOAD_MARKETS", default="",
                       help="markets to use, comma-separated (default: the server's among all, csi300, csi100, "
                            "csi500, sp500, nasdaq100)")
    group.add_argument("--qlib-start", env_var="QLIB_LOAD_START", default="", help="first date to ask for")
    group.add_argument("--qlib-end", env_var="QLIB_LOAD_END", default="", help="last date to ask for")
    group.add_argument("--qlib-fields", env_var="QLIB_LOAD_FIELDS", default="",
                       help="base fields, comma-separated (default: $open,$high,$low,$close,$volume,$factor,"
                            "$change,$vwap)")


def prepare(environment) -> bool:
    """Read the server's calendar and markets and build the workload (once per process); False on failure."""
    global WORKLOAD, MIX
    if WORKLOAD is not None:
        return True
    options = environment.parsed_options
    get = (lambda name: getattr(options, name, "") or None) if options is not None else (lambda name: None)
    try:
        profile = discover(environment.host, markets=get("qlib_markets"), start=get("qlib_start"),
                           end=get("qlib_end"), fields=get("qlib_fields"), timeout=QlibSocketIOUser.timeout)
    except Exception as exc:  # unreachable, refused (DataProfileError: data the scenarios cannot use)
        logging.error("qlib load: cannot read the server's data at %s: %s", environment.host, exc)
        environment.process_exit_code = 1
        return False
    WORKLOAD = Workload(profile)
    MIX = ZipfChooser(WORKLOAD.mix_universe())
    print(WORKLOAD.describe(), file=sys.stderr, flush=True)
    return True


@events.init.add_listener
def _read_the_data(environment, **_kwargs) -> None:
    """Read the server's data before the run's clock starts, when this process knows the host already.

    A distributed worker learns the host only with its first spawn message: it reads at test start.
    Then bring gevent's cached loop time up to date before Locust arms its ``-t`` timer: the hub last
    ran before the locustfiles were imported (and the reading); timers count from its stale clock, so
    without this a ``-t 20s`` run stops as many seconds early as they took (4 s seen under load).
    """
    if environment.host and not isinstance(environment.runner, MasterRunner) and not prepare(environment):
        sys.exit(1)
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _read_the_data_late(environment, **_kwargs) -> None:
    if not isinstance(environment.runner, MasterRunner) and not prepare(environment):
        environment.runner.quit()


class HotUser(QlibSocketIOUser):
    """Repeats one calendar, one instrument list and one small feature set."""

    weight = 3
    wait_time = between(0.0, 0.1)

    @task
    def calendar(self):
        self.request("calendar", WORKLOAD.hot_calendar, "hot calendar")

    @task
    def instruments(self):
        self.request("instrument", WORKLOAD.hot_instruments, "hot instrument")

    @task(2)
    def features(self):
        self.request("feature", WORKLOAD.hot_features, "hot feature")


class ColdUser(QlibSocketIOUser):
    """Asks for a feature set with a field combination never requested before."""

    weight = 1
    wait_time = between(0.0, 0.1)

    @task
    def features(self):
        self.request("feature", WORKLOAD.cold_features(), "cold feature")


class MixUser(QlibSocketIOUser):
    """Draws from ~100 requests with zipf-like popularity, so users overlap on the popular ones."""

    weight = 2
    wait_time = between(0.0, 0.1)

    @task
    def draw(self):
        kind, body = MIX.choose()
        self.request(kind, body, f"mix {kind}")
