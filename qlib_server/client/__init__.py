"""Qlib without a shared mount: providers that get everything from a Qlib-Server.

    import qlib
    from qlib_server.client import client_config
    qlib.init(**client_config("qlib-server.example", 9710), region="cn")

Imports nothing of the server side (no Flask, gevent, pika or Redis); the providers (and Qlib) load
when Qlib asks for them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["client_config", "ServerCalendarProvider", "ServerInstrumentProvider", "ServerDatasetProvider",
           "ServerProvider", "ServerConnection", "RequestTimeout", "AdmissionRefused"]
_PROVIDERS = ("ServerCalendarProvider", "ServerInstrumentProvider", "ServerDatasetProvider", "ServerProvider")
_CONNECTION = ("ServerConnection", "RequestTimeout", "AdmissionRefused")


def client_config(host: str, port: int = 9710, *, timeout: float = 100.0, auth_token: str | None = None,
                  retries: int = 3, max_inflight: int = 8, compression: str = "auto", delivery: str = "auto",
                  **qlib_options: Any) -> dict:
    """Keyword arguments for ``qlib.init`` wiring Qlib's providers to the server at ``host:port``.

    ``timeout``: seconds one request may take (connecting, computing and transferring included);
    ``auth_token``: the server's ``auth_token``; ``retries``: how many times a request whose connection
    dropped is sent again; ``max_inflight``: concurrent requests of this process (the server's
    ``max_inflight_per_client``); ``compression`` of feature rows: ``lz4``, ``zstd``, ``none`` or ``auto``
    (uncompressed when the server is on this host, where compressing costs time and saves no network;
    lz4 otherwise); ``delivery`` of feature rows: ``stream`` (over the connection), ``files`` (this process maps
    the server's cache files, where it can, see :mod:`qlib_server.client.placed`; it streams where it cannot) or
    ``auto`` (files when the server is on this host, the stream otherwise). Any other
    keyword (``provider_uri``, ``logging_level``, ...) is passed to ``qlib.init`` as it is.
    """
    from .providers import ServerProvider

    options = {"host": host, "port": int(port), "timeout": timeout, "auth_token": auth_token, "retries": retries,
               "max_inflight": max_inflight, "compression": compression,
               "delivery": delivery}

    def provider(name: str) -> dict:
        return {"class": name, "module_path": __name__, "kwargs": dict(options)}

    return {"default_conf": "client", "flask_server": host, "flask_port": int(port), "timeout": timeout,
            "calendar_provider": provider("ServerCalendarProvider"),
            "instrument_provider": provider("ServerInstrumentProvider"),
            "dataset_provider": provider("ServerDatasetProvider"), "provider": ServerProvider,
            "dataset_cache": None, "expression_cache": None, **qlib_options}


def __getattr__(name: str):
    if name in _PROVIDERS:
        from . import providers

        return getattr(providers, name)
    if name in _CONNECTION:
        from . import connection

        return getattr(connection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
