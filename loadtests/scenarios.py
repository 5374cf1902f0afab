"""Locust scenarios against a Qlib-Server: ``locust -f loadtests/ --headless -H http://HOST:PORT [HotUser ...]``.

- HotUser: the same calendar, instrument list and small feature set again and again (cache and dedup hits).
- ColdUser: a feature set nobody asked for before on every request (a fresh computation each time).
- MixUser: overlapping requests, drawn zipf-like from a universe of about 100.

Without class names on the command line Locust runs all three by their weights.
"""

from __future__ import annotations

import gevent
from locust import between, events, task

try:  # imported as part of the loadtests package
    from ._socketio_user import QlibSocketIOUser
    from ._workload import HOT_CALENDAR, HOT_FEATURES, HOT_INSTRUMENTS, ZipfChooser, cold_features, mix_universe
except ImportError:  # loaded by locust as a top-level locustfile, with this directory on sys.path
    from _socketio_user import QlibSocketIOUser
    from _workload import HOT_CALENDAR, HOT_FEATURES, HOT_INSTRUMENTS, ZipfChooser, cold_features, mix_universe


@events.init.add_listener
def _refresh_loop_clock(**_kwargs) -> None:
    """Bring gevent's cached loop time up to date before Locust arms its ``-t`` timer.

    The hub last ran before the locustfiles were imported; timers count from its stale clock, so
    without this a ``-t 20s`` run stops as many seconds early as the imports took (4 s seen under load).
    """
    gevent.get_hub().loop.update_now()


class HotUser(QlibSocketIOUser):
    """Repeats one calendar, one instrument list and one small feature set."""

    weight = 3
    wait_time = between(0.0, 0.1)

    @task
    def calendar(self):
        self.request("calendar", HOT_CALENDAR, "hot calendar")

    @task
    def instruments(self):
        self.request("instrument", HOT_INSTRUMENTS, "hot instrument")

    @task(2)
    def features(self):
        self.request("feature", HOT_FEATURES, "hot feature")


class ColdUser(QlibSocketIOUser):
    """Asks for a feature set with a field combination never requested before."""

    weight = 1
    wait_time = between(0.0, 0.1)

    @task
    def features(self):
        self.request("feature", cold_features(), "cold feature")


class MixUser(QlibSocketIOUser):
    """Draws from ~100 requests with zipf-like popularity, so users overlap on the popular ones."""

    weight = 2
    wait_time = between(0.0, 0.1)
    universe = ZipfChooser(mix_universe())

    @task
    def draw(self):
        kind, body = self.universe.choose()
        self.request(kind, body, f"mix {kind}")
