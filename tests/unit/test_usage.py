"""The uses of dataset caches a handler counts reach Redis by day, and a refresh reads the last days' sum."""

import datetime as dt

import fakeredis
import pytest

from qlib_server.state import keys, usage


def test_uses_counted_in_memory_reach_todays_set_and_sum_over_the_last_days():
    client = fakeredis.FakeRedis()
    counted = usage.Usage()
    for uri in ["a", "b", "a", "a"]:
        counted.note(uri)
    counted.flush(client)
    counted.flush(client)  # nothing new: nothing added
    yesterday = (dt.date.today() - dt.timedelta(days=1)).isoformat()
    long_ago = (dt.date.today() - dt.timedelta(days=10)).isoformat()
    client.zincrby(keys.usage(yesterday), 5, "b")
    client.zincrby(keys.usage(long_ago), 9, "c")
    assert usage.recent(client, 1) == {"a": 3.0, "b": 1.0}
    assert usage.recent(client, 7) == {"a": 3.0, "b": 6.0}
    assert usage.recent(client, 0) == {}
    assert client.ttl(keys.usage(dt.date.today().isoformat())) > 30 * 86400


def test_uses_are_kept_for_the_next_flush_when_redis_fails():
    counted = usage.Usage()
    counted.note("a", 2)

    class Down(fakeredis.FakeRedis):
        def pipeline(self, *args, **kwargs):
            raise ConnectionError("redis is away")

    with pytest.raises(ConnectionError):
        counted.flush(Down())
    client = fakeredis.FakeRedis()
    counted.flush(client)
    assert usage.recent(client, 1) == {"a": 2.0}
