"""Message brokers: one small interface, one module per transport."""

from .base import Broker, Delivery, decode, encode

__all__ = ["Broker", "Delivery", "decode", "encode"]
