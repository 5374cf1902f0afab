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


def waiters(key: str) -> str:
    return WAITERS + key


def waiters_lock(key: str) -> str:
    return WAITERS_LOCK + key


#: JSON of a computed answer, per data generation and request key (see ``cache.ResultCache``)
RESULT = f"{PREFIX}:result:"
#: integer bumped whenever the data directory changes; part of every result key
GENERATION = f"{PREFIX}:data-generation"


def result(generation: int, key: str) -> str:
    return f"{RESULT}{generation}:{key}"
