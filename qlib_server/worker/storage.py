"""Qlib's feature files, read with one open and one path look-up.

Qlib's ``FileFeatureStorage`` builds the file's path nine times for one read of a feature (each time
resolving the provider URI and, once per storage object, listing the calendars directory) and opens the
file three times: a third of a cold feature computation went there. :class:`FeatureFile` gives the same
``pandas.Series`` (float32 values, a ``RangeIndex`` of calendar positions) from a single ``numpy.fromfile``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
from qlib.data.storage.file_storage import FileFeatureStorage, FileStorageMixin

#: the ``backend`` of Qlib's ``LocalFeatureProvider`` that reads through :class:`FeatureFile`
BACKEND = {"class": "FeatureFile", "module_path": __name__}


_FREQS: dict[str, list] = {}  # data directory -> the frequencies of its calendars (Qlib's support_freq)


def forget() -> None:
    """Look at the calendars again on the next read (after the data changed)."""
    _FREQS.clear()


class FeatureFile(FileFeatureStorage):
    """Qlib's feature storage (same answers), reading a slice of a feature with one open."""

    @property
    def support_freq(self) -> list:
        key = repr(self.provider_uri)
        if key not in _FREQS:
            _FREQS[key] = FileStorageMixin.support_freq.fget(self)
        return _FREQS[key]

    @functools.cached_property
    def uri(self) -> Path:
        return FileStorageMixin.uri.fget(self)

    def __getitem__(self, i: Union[int, slice]):
        if not isinstance(i, slice):
            return super().__getitem__(i)
        try:
            raw = np.fromfile(self.uri, dtype="<f")
        except FileNotFoundError:
            return pd.Series(dtype=np.float32)
        if raw.size == 0:  # no start index: Qlib's own error
            return super().__getitem__(i)
        first = int(raw[0])
        start = first if i.start is None else max(i.start, first)
        end = first + raw.size - 2 if i.stop is None else i.stop - 1
        if start > end:
            return pd.Series(dtype=np.float32)
        data = raw[1 + start - first: 2 + end - first]
        return pd.Series(data, index=pd.RangeIndex(start, start + len(data)))
