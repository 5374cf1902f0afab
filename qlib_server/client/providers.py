"""Qlib providers that get calendars, instrument lists and feature rows from a Qlib-Server.

Qlib loads them by config (see :func:`qlib_server.client.client_config`); they read nothing from a
data directory. Calendars are asked once per frequency and kept like Qlib keeps local ones; the
rest of Qlib's calendar logic (``locate_index``, ``future``) runs unchanged on them.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from qlib.data.data import BaseProvider, Cal, CalendarProvider, DatasetProvider, InstrumentProvider
from qlib.data.inst_processor import InstProcessor

from .connection import shared_connection


class _Remote:
    """Holds the shared connection of the provider's server."""

    def __init__(self, host: str, port: int, **options):
        self.conn = shared_connection(host, port, **options)


class ServerCalendarProvider(_Remote, CalendarProvider):
    """Calendars from the server (the whole calendar of a frequency, once; Qlib slices it)."""

    def load_calendar(self, freq, future):
        body = {"start_time": "None", "end_time": "None", "freq": freq, "future": future}
        return [pd.Timestamp(t) for t in self.conn.request("calendar", body)]


class ServerInstrumentProvider(_Remote, InstrumentProvider):
    """Instrument lists and spans from the server (markets, ``NameDFilter``, ``ExpressionDFilter``)."""

    def list_instruments(self, instruments, start_time=None, end_time=None, freq="day", as_list=False):
        body = {"instruments": instruments, "start_time": str(start_time), "end_time": str(end_time), "freq": freq,
                "as_list": as_list}
        result = self.conn.request("instrument", body)
        if isinstance(result, dict):
            return {code: [(pd.Timestamp(s), pd.Timestamp(e)) for s, e in spans] for code, spans in result.items()}
        return result


class ServerDatasetProvider(_Remote, DatasetProvider):
    """Feature rows from the server's dataset cache, delivered inline (``disk_cache`` 0 and 1 alike:
    the client has no data to compute from). Instruments are a market config, codes, or a dict of codes
    and their spans (``D.list_instruments``); ``inst_processors`` run on the server (Qlib's own and those
    in its ``inst_processors_allowed``), sent as configs: an instance as its class and attributes."""

    def dataset(self, instruments, fields, start_time=None, end_time=None, freq="day", disk_cache=1,
                return_uri=False, inst_processors=None):
        if isinstance(instruments, (tuple, pd.Index, np.ndarray)):
            instruments = list(instruments)
        column_names = self.get_column_names(fields)
        if len(Cal.calendar(start_time, end_time, freq)) == 0:  # as local Qlib answers an empty date range
            index = pd.MultiIndex.from_arrays([[], []], names=("instrument", "datetime"))
            return pd.DataFrame(index=index, columns=column_names)
        body = {"instruments": instruments, "fields": column_names, "start_time": start_time, "end_time": end_time,
                "freq": freq, "disk_cache": 1}
        processors = [wire_processor(p) for p in inst_processors or [] if p]  # Qlib skips empty ones
        if processors:
            body["inst_processors"] = processors
        frame = self.conn.features(body, column_names)
        return (frame, None) if return_uri else frame


TIMESTAMP = "__timestamp__"  # a date in a processor's values (qlib_server.inst_processors reads it)


def wire_value(value, where: str):
    """A processor's argument or attribute as the server reads it: JSON, dates as ``{"__timestamp__": ...}``."""
    if isinstance(value, (dt.date, pd.Timestamp, np.datetime64)):
        return {TIMESTAMP: str(pd.Timestamp(value))}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [wire_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: wire_value(v, where) for k, v in value.items()}
    raise ValueError(f"{where} holds {type(value).__name__}, which cannot be sent to the server: give the "
                     "processor as a config of plain values and dates")


def wire_processor(processor) -> dict:
    """One of Qlib's ``inst_processors`` (a config, or an ``InstProcessor`` instance) in the wire form of
    :mod:`qlib_server.inst_processors`."""
    if isinstance(processor, InstProcessor):
        kind = type(processor)
        return {"class": kind.__name__, "module_path": kind.__module__,
                "state": wire_value(vars(processor), f"inst_processor {kind.__name__}")}
    if isinstance(processor, dict) and "class" in processor:
        config = dict(processor)
        if isinstance(config["class"], type):  # Qlib also takes the class itself
            config["class"], config["module_path"] = config["class"].__name__, config["class"].__module__
        if "kwargs" in config:
            config["kwargs"] = wire_value(config["kwargs"], f"inst_processor {config['class']} kwargs")
        return config
    raise ValueError(f"an inst_processor must be an InstProcessor or a config {{'class': ..., 'module_path': ..., "
                     f"'kwargs': ...}} to run on the server, not {type(processor).__name__}")


class ServerProvider(BaseProvider):
    """Qlib's ``D`` over the server providers (they hold the connection)."""
