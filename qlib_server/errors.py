"""The exception hierarchy of Qlib-Server; transport errors are translated into it at the boundary."""


class QlibServerError(Exception):
    """Base of every error this package raises on purpose."""

    status = 2


class ConfigError(QlibServerError):
    """The configuration file or a setting is invalid."""


class RequestError(QlibServerError):
    """The client's request is malformed, refused or outside the limits (answered with status 1)."""

    status = 1


class ComputeError(QlibServerError):
    """Qlib failed to compute a valid request (answered with status 2)."""

    status = 2


class BrokerError(QlibServerError):
    """A message broker operation failed."""


class ConnectionLost(BrokerError):
    """The connection to the broker or to Redis was lost; the caller may reconnect and retry."""
