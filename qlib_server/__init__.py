"""Qlib-Server: one managed copy of Qlib data served to many Qlib clients.

The data flows in one direction::

    socket ─► listener ─► registry (Redis) / task queue (RabbitMQ) ─► processor (Qlib)
           ◄─ responder ◄───────────── message queue (RabbitMQ) ◄──────┘

The package follows it: ``front/`` (``handler`` wires the Socket.IO app to ``listener`` and
``responder``; the status page; feature transfer), ``worker/`` (``processor`` supervises the workers that
call ``compute``; data updates; Qlib's dataset cache), ``state/`` (what the processes share in Redis and
on disk), ``broker/`` (the transports), ``client/`` (Qlib providers for clients; imports nothing of the
server). At the top: ``protocol`` decodes and checks requests, ``expressions``, ``config``, ``errors``,
``metrics``, ``admission``, ``log``, and the entry points ``cli`` and ``embedded``. Imports run down:
``front`` and ``worker`` build on ``state`` and ``broker``, never on each other
(``tests/unit/test_layers.py``).
"""

__version__ = "0.2.0"
