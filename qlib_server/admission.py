"""Who may connect: the rule of ``allowed_networks`` and ``auth_token``, for Socket.IO clients, the
status page, the handler's ``/metrics`` and a data processor's ``processor_metrics_port``.

A connection is admitted when its address is in one of the networks or it presents the token; with
neither key set, anyone who reaches the port is. Over HTTP the token comes as ``Authorization: Bearer
<token>`` (what Prometheus sends) or as ``?token=<token>`` (what a browser can put in a link).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from socketserver import ThreadingMixIn
from typing import Optional
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)


class Admission:
    """The admission rule of one server's config."""

    def __init__(self, allowed_networks: list[str], auth_token: Optional[str]):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self.token = auth_token

    def admits(self, address: Optional[str], token) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            ip = None
        by_network = ip is not None and any(ip in n for n in self.networks)
        by_token = bool(self.token) and isinstance(token, str) and hmac.compare_digest(token.encode(),
                                                                                       self.token.encode())
        return by_network or by_token or (not self.networks and not self.token)

    def admits_http(self, address: Optional[str], authorization: Optional[str], query: str) -> bool:
        """Whether an HTTP request from ``address`` with these ``Authorization`` header and query string
        is admitted."""
        scheme, _, credentials = (authorization or "").partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else None
        if token is None:
            token = (parse_qs(query).get("token") or [None])[0]
        return self.admits(address, token)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_) -> None:  # one line per scrape would drown the processor's log
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(registry: CollectorRegistry, host: str, port: int, admission: Admission) -> Optional[int]:
    """Serve ``registry`` in Prometheus format on ``host:port`` (any path) from a daemon thread, to the
    clients ``admission`` admits. When ``port`` is taken (several processors on one host), a free port
    is used instead; return the port served, or None when none could be bound (logged)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if not admission.admits_http(environ.get("REMOTE_ADDR"), environ.get("HTTP_AUTHORIZATION"),
                                     environ.get("QUERY_STRING", "")):
            log.warning("refused connection from %s", environ.get("REMOTE_ADDR"))
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"forbidden: not in allowed_networks and no valid auth_token\n"]
        return metrics_app(environ, start_response)

    for candidate in (port, 0):
        try:
            server = make_server(host, candidate, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
            break
        except OSError as exc:
            error = exc
    else:
        log.warning("cannot serve metrics on %s (%s)", host, error)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    bound = server.server_address[1]
    log.info("processor metrics on http://%s:%d/%s", host, bound, "" if bound == port else f" ({port} was taken)")
    return bound
