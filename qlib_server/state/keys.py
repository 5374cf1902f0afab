"""Every Redis key this server writes, and how long each may live.

A crashed component never blocks a key for ever: locks expire, and so do waiting lists whose task
was lost (their clients have been answered with a timeout error by then).
"""

PREFIX = "qlib_server"

#: list of the Socket.IO session ids waiting for the answer to one request key
WAITERS = f"{PREFIX}:waiters:"
#: python-redis-lock name guarding one waiting list (the library prefixes it with ``lock:``)
WAITERS_LOCK = f"{PREFIX}:waiters-lock:"

#: seconds a registry lock may be held before Redis frees it (the critical sections take milliseconds)
LOCK_EXPIRE = 10
#: seconds a waiting list outlives the request timeout, in case no handler is left to clear it
WAITERS_GRACE = 60


#: seconds a request's waiter entry must stay missing (seen twice) before its handler serves it again
LOST_AFTER = 1.0


def waiters(key: str) -> str:
    return WAITERS + key


def waiters_lock(key: str) -> str:
    return WAITERS_LOCK + key


#: JSON of a computed answer, per data generation and request key (see ``cache.ResultCache``)
RESULT = f"{PREFIX}:result:"
#: integer bumped whenever the data directory changes; part of every result key
GENERATION = f"{PREFIX}:data-generation"
#: digest of the data directory when the data processors last checked the caches against it
DATA_DIGEST = f"{PREFIX}:data-digest"
#: hash: the progress of the last refresh's extension of dataset caches (state, total, extended, failed, times)
REFRESH = f"{PREFIX}:refresh"
#: sorted set per day: dataset cache name → uses that day (``usage.Usage``); this prefix, then the date
USAGE = f"{PREFIX}:cache-usage:"


def usage(day: str) -> str:
    return USAGE + day

#: python-redis-lock name of the lock on one of Qlib's caches: this prefix, then Qlib's name for it
QLIB_CACHE_LOCK = f"{PREFIX}:qlib-cache-lock:"
#: seconds a Qlib cache lock outlives its holder's last renewal (a live holder renews it every 2/3 of that)
QLIB_CACHE_LOCK_EXPIRE = 10


def result(generation: int, key: str) -> str:
    return f"{RESULT}{generation}:{key}"


#: RabbitMQ queue (not a Redis key) where other handlers forward the answers of one handler's clients
INBOX = f"{PREFIX}.inbox."
#: seconds an inbox outlives its handler (RabbitMQ deletes a queue unused that long)
INBOX_EXPIRE = 300


def inbox(node: str) -> str:
    return INBOX + node


#: JSON snapshot of one live process (a handler or a data processor) for the status page; it expires
#: unless its process renews it, so a dead process leaves the page by itself
FLEET = f"{PREFIX}:fleet:"
#: set of the snapshot keys written (a reader drops the members whose snapshot has expired)
FLEET_INDEX = f"{PREFIX}:fleet-index"
#: seconds a snapshot outlives its last renewal (each process renews its own every second)
FLEET_TTL = 5
#: seconds the index outlives its last write, once no process is left to renew it
FLEET_INDEX_TTL = 60


def fleet(kind: str, ident: str) -> str:
    return f"{FLEET}{kind}:{ident}"
