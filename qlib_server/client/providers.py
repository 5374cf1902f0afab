"""Qlib providers that get calendars, instrument lists and feature rows from a Qlib-Server.

Qlib loads them by config (see :func:`qlib_server.client.client_config`); they read nothing from a
data directory. Calendars are asked once per frequency and kept like Qlib keeps local ones; the
rest of Qlib's calendar logic (``locate_index``, ``future``) runs unchanged on them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from qlib.data.data import BaseProvider, Cal, CalendarProvider, DatasetProvider, InstrumentProvider

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
    the client has no data to compute from)."""

    def dataset(self, instruments, fields, start_time=None, end_time=None, freq="day", disk_cache=1,
                return_uri=False, inst_processors=None):
        if inst_processors:
            raise ValueError(f"{self.__class__.__name__} does not support inst_processor: the server computes "
                             "features without them")
        if isinstance(instruments, dict) and "market" not in instruments:
            raise ValueError("a dict of instruments and spans is not supported by the server: pass a market "
                             "config (D.instruments) or a list of codes")
        if isinstance(instruments, (tuple, pd.Index, np.ndarray)):
            instruments = list(instruments)
        column_names = self.get_column_names(fields)
        if len(Cal.calendar(start_time, end_time, freq)) == 0:  # as local Qlib answers an empty date range
            index = pd.MultiIndex.from_arrays([[], []], names=("instrument", "datetime"))
            return pd.DataFrame(index=index, columns=column_names)
        body = {"instruments": instruments, "fields": column_names, "start_time": start_time, "end_time": end_time,
                "freq": freq, "disk_cache": 1}
        frame = self.conn.features(body, column_names)
        return (frame, None) if return_uri else frame


class ServerProvider(BaseProvider):
    """Qlib's ``D`` over the server providers (they hold the connection)."""
