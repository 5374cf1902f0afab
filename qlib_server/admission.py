"""Who may connect: the rule of ``allowed_networks`` and ``auth_token``, for Socket.IO clients, the
status page, the handler's ``/metrics`` and a data processor's ``processor_metrics_port``.

A connection is admitted when its address is in one of the networks or it presents the token; with
neither key set, anyone who reaches the port is. Over HTTP the token comes as ``Authorization: Bearer
<token>`` (what Prometheus sends) or as ``?token=<token>`` (what a browser can put in a link).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Optional
from urllib.parse import parse_qs


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
        by_token = bool(self.token and isinstance(token, str)
                        and hmac.compare_digest(token.encode(), self.token.encode()))
        return by_network or by_token or (not self.networks and not self.token)

    def admits_http(self, address: Optional[str], authorization: Optional[str], query: str) -> bool:
        """Whether an HTTP request from ``address`` with these ``Authorization`` header and query string
        is admitted."""
        scheme, _, credentials = (authorization or "").partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else None
        if token is None:
            tokens = parse_qs(query).get("token")
            token = tokens[0] if tokens else None
        return self.admits(address, token)
