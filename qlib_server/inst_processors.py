"""Qlib's instrument processors (``inst_processors``) in feature requests: which may run on the server,
their wire form and its check, the dataset cache they key, and building them in a worker.

Qlib applies each processor to each instrument's frame of the requested window (``inst_calculator``), so
the result depends on the window: a request with processors gets a dataset cache of its own window, keyed
by the processors and the dates too (:mod:`qlib_server.dataset_keys`), holding exactly Qlib's frame.

Only processors named in the allow-list run: Qlib's own (:data:`QLIB_INST_PROCESSORS`) and those in the
server's ``inst_processors_allowed``. A name is resolved by the worker itself (``importlib`` of the allowed
module, never a ``.py`` path, a ``file://`` pickle or anything else Qlib's ``init_instance_by_config``
would load), and must be a subclass of Qlib's ``InstProcessor``.

Wire form: a list of at most :data:`MAX_PROCESSORS` mappings, each Qlib's config of one
(``{"class": "TimeRangeFlt", "module_path": "qlib.data.dataset.processor", "kwargs": {...}}``, or a
dotted ``class`` without ``module_path``), or an instance (``{"class": ..., "module_path": ...,
"state": {...}}``: its attributes, set on an object made without calling ``__init__``, as unpickling
does; ``qlib_server.client`` sends instances so). Values are JSON (strings, numbers, booleans, null,
lists, mappings with string keys) and dates, written ``{"__timestamp__": "2019-01-02 00:00:00"}`` and
built as ``pd.Timestamp``. Checked and normalised, each is ``{"class": "<module>.<Class>", "kwargs": ...}``
or ``{"class": ..., "state": ...}``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
from collections.abc import Iterable
from typing import Any, cast

import pandas as pd

from .errors import ComputeError, RequestError

#: every concrete ``InstProcessor`` pyqlib 0.9.7 ships (``qlib.data.inst_processor`` holds only the abstract base)
QLIB_INST_PROCESSORS = ("qlib.data.dataset.processor.TimeRangeFlt",)
#: processors of one request at most
MAX_PROCESSORS = 16
#: nesting of the values of one processor's ``kwargs`` or ``state`` at most
MAX_DEPTH = 8
#: the key of a date in the wire form
TIMESTAMP = "__timestamp__"
SETTING = "inst_processors_allowed"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_KEYS = {"class", "module_path", "kwargs", "state"}
_EARLIEST, _LATEST = pd.Timestamp("1900-01-01"), pd.Timestamp("2200-12-31")


def is_dotted_name(name: Any) -> bool:
    """Whether ``name`` reads ``module.Class`` (identifiers joined by dots, at most 200 characters)."""
    return isinstance(name, str) and len(name) <= 200 and _DOTTED.fullmatch(name) is not None


def allowed(extra: Iterable[str] = ()) -> frozenset[str]:
    """The processors a server runs: Qlib's own and ``extra`` (its ``inst_processors_allowed``)."""
    return frozenset(QLIB_INST_PROCESSORS) | frozenset(extra)


def _show(value: Any) -> str:
    return repr(value[:60]) if isinstance(value, str) else f"a {type(value).__name__}"


def _stamp(value: Any, where: str) -> str:
    if not isinstance(value, (str, dt.date, dt.datetime, pd.Timestamp)) or (isinstance(value, str) and len(value) > 40):
        raise RequestError(f"{where}: a date must be a date string, not {_show(value)}")
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(f"{where}: {_show(value)} is not a date") from None
    if stamp is pd.NaT or stamp.tzinfo is not None or not _EARLIEST <= stamp <= _LATEST:
        raise RequestError(f"{where}: {_show(str(value))} is not a naive date in 1900..2200")
    return str(stamp)


def _value(value: Any, where: str, depth: int = 0) -> Any:
    """A checked value of a processor's ``kwargs`` or ``state``, in the wire form."""
    if depth > MAX_DEPTH:
        raise RequestError(f"{where}: values nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (dt.date, pd.Timestamp)):  # a pickled body holds dates themselves
        return {TIMESTAMP: _stamp(value, where)}
    if isinstance(value, (list, tuple)):
        return [_value(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        if set(value) == {TIMESTAMP}:
            return {TIMESTAMP: _stamp(value[TIMESTAMP], where)}
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 200:
                raise RequestError(f"{where}: keys must be strings of at most 200 characters, not {_show(key)}")
            out[key] = _value(item, where, depth + 1)
        return out
    raise RequestError(f"{where}: a value may not be {_show(value)}")


def check(value: Any, allowed_names: frozenset[str]) -> list[dict]:
    """The normalised processors of a request's ``inst_processors`` (``[]`` for none); raise
    :class:`RequestError` for anything else, naming ``inst_processors_allowed`` for a processor not in it."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PROCESSORS:
        raise RequestError(f"inst_processors must be a list of at most {MAX_PROCESSORS} processor configs "
                           '({"class": ..., "module_path": ..., "kwargs": {...}})')
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            raise RequestError('an inst_processor must be a config {"class": ..., "module_path": ..., "kwargs": '
                               f"{{...}}}}, not {_show(item)}")
        unknown = set(item) - _KEYS
        if unknown:
            raise RequestError(f"unknown keys in an inst_processor: {sorted(str(k)[:40] for k in unknown)[:5]}")
        if "kwargs" in item and "state" in item:
            raise RequestError("an inst_processor has kwargs (a config) or state (an instance), not both")
        name = item["class"]
        if "." not in name:  # Qlib's {"class": "Name", "module_path": "a.b"}
            module = item.get("module_path")
            if not isinstance(module, str):
                raise RequestError(f"inst_processor {_show(name)} names no module_path")
            name = f"{module}.{name}"
        if not is_dotted_name(name):
            raise RequestError(f"inst_processor {_show(name)} is not a module.Class name")
        if name not in allowed_names:
            raise RequestError(f"inst_processor {name[:120]!r} may not run on this server: it runs Qlib's own "
                               f"and those listed in the server's {SETTING}")
        kind = "state" if "state" in item else "kwargs"
        values = _value(item.get(kind) or {}, f"inst_processor {name[:120]} {kind}")
        if not isinstance(values, dict) or set(values) == {TIMESTAMP}:
            raise RequestError(f"the {kind} of inst_processor {name[:120]} must be a mapping of names to values")
        out.append({"class": name, kind: values})
    return out


def _built(value: Any) -> Any:
    if isinstance(value, list):
        return [_built(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {TIMESTAMP}:
            return pd.Timestamp(value[TIMESTAMP])
        return {k: _built(v) for k, v in value.items()}
    return value


def build(processors: list) -> list:
    """Qlib ``InstProcessor`` instances of checked processors (in a worker, with Qlib initialised)."""
    from qlib.data.inst_processor import InstProcessor

    built = []
    for spec in processors:
        module_name, _, class_name = spec["class"].rpartition(".")
        try:
            klass = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError as exc:
            raise ComputeError(f"inst_processor {spec['class']} cannot be imported on this server ({exc}); "
                               f"check {SETTING}") from None
        if not (isinstance(klass, type) and issubclass(klass, InstProcessor)):
            raise RequestError(f"inst_processor {spec['class']} is not a subclass of Qlib's InstProcessor")
        if "state" in spec:
            instance = cast(Any, klass).__new__(klass)  # as unpickling makes an object
            instance.__dict__.update(_built(spec["state"]))
        else:
            try:
                instance = klass(**_built(spec["kwargs"]))
            except TypeError as exc:  # kwargs it does not take
                raise RequestError(f"inst_processor {spec['class']}: {str(exc)[:200]}") from None
        built.append(instance)
    return built
