"""Qlib-Server: one managed copy of Qlib data served to many Qlib clients.

The data flows in one direction::

    socket ─► listener ─► registry (Redis) / task queue (RabbitMQ) ─► processor (Qlib)
           ◄─ responder ◄───────────── message queue (RabbitMQ) ◄──────┘

``handler`` wires the Socket.IO front to ``listener`` and ``responder``; ``processor`` runs the
workers that call ``compute``; ``broker`` holds the transports; ``protocol`` decodes and checks requests.
"""

__version__ = "0.2.0"
