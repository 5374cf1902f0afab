"""The wire protocol: decoding a client's request, checking it, and its canonical key.

A request event carries ``{"head": {"version": ...}, "body": ...}``; the body is a pickle (released
pyqlib 0.9.x), a JSON string (Qlib's main branch) or an already decoded mapping (plain Socket.IO
clients). Whatever the encoding, :func:`parse_request` returns a :class:`Request` whose ``args`` are
plain JSON values normalised so that equivalent requests have equal ``args`` and the same ``key``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import dataset_keys, inst_processors
from .errors import RequestError
from .safe_pickle import safe_unpickle

REQUEST_TYPES = ("calendar", "instrument", "feature")
_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,64}")  # market names, instrument codes
_FREQ = re.compile(r"[0-9]{0,4}(day|d|min|minute|week|w|month|mon)", re.IGNORECASE)
_FILTERS = {"NameDFilter": ("name_rule_re",), "ExpressionDFilter": ("rule_expression", "keep")}
_EARLIEST, _LATEST = pd.Timestamp("1900-01-01"), pd.Timestamp("2200-12-31")
MAX_SPANS = 1000  # (start, end) spans of one instrument in a dict of instruments

def _show(value: Any, limit: int = 40) -> str:
    """Client input for an error message: a short prefix of a string, never str() of anything big."""
    if isinstance(value, str):
        return repr(value[:limit])
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**18):
        return repr(value)
    return f"a {type(value).__name__}"


def _key(key: Any) -> str:
    """A mapping key for an error message: a short prefix of a string key, the type of any other."""
    return key[:40] if isinstance(key, str) else f"<{type(key).__name__}>"


@dataclass(frozen=True)
class Limits:
    """Bounds a request must stay within."""

    max_body_bytes: int = 1 << 20
    max_fields: int = 1024
    max_instruments: int = 20000
    max_expression_length: int = 2000
    max_expression_depth: int = 32


@dataclass(frozen=True)
class Request:
    """A decoded, checked request: its type, normalised arguments and canonical key."""

    type: str
    args: dict
    key: str
    version: str

    @property
    def light(self) -> bool:
        """Whether this is a millisecond task: a calendar, or an instrument list without expressions."""
        if self.type == "calendar":
            return True
        return self.type == "instrument" and not any(
            f["filter_type"] == "ExpressionDFilter" for f in self.args["instruments"]["filter_pipe"])

    def task(self, generation: int = 0) -> dict:
        """The message published to the task queue for this request."""
        return {"key": self.key, "type": self.type, "args": self.args, "generation": generation}


def check_version(version: Any, spec: str) -> str:
    """Return the client version when it satisfies ``spec``; raise :class:`RequestError` otherwise."""
    if not isinstance(version, str) or len(version) > 64:
        raise RequestError("request head must carry the client's qlib version as a string")
    text = version[:-4] if version.lower().endswith(".dev") else version
    try:
        parsed = Version(text)
    except InvalidVersion:
        raise RequestError(f"client version {version!r} is not a valid version") from None
    if not SpecifierSet(spec).contains(parsed, prereleases=True):
        raise RequestError(f"client version {version} is not supported (server accepts qlib {spec}); please upgrade")
    return version


def _time(value: Any, what: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "NaT")):
        return None
    if not isinstance(value, (str, dt.date, dt.datetime, pd.Timestamp)) or (isinstance(value, str) and len(value) > 40):
        raise RequestError(f"{what} must be a date or a date string, not {type(value).__name__}")
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"{what} {str(value)[:40]!r} is not a date: {exc}") from None
    if stamp is pd.NaT or stamp.tzinfo is not None:
        raise RequestError(f"{what} must be a naive date, got {str(value)[:40]!r}")
    if not _EARLIEST <= stamp <= _LATEST:
        raise RequestError(f"{what} {stamp} is outside {_EARLIEST.year}..{_LATEST.year}")
    return str(stamp)


def _freq(value: Any) -> str:
    if not isinstance(value, str) or not _FREQ.fullmatch(value):
        raise RequestError(f"freq must be a frequency such as 'day' or '1min', got {_show(value)}")
    return value.lower()


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.strip(".") != value:
        raise RequestError(f"{what} {_show(value, 70)} is not a valid name (letters, digits, _ - . only)")
    return value


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RequestError(f"{what} must be true or false, got {_show(value)}")


class RequestParser:
    """Turns raw request events into :class:`Request` objects, enforcing version and limits."""

    #: bodies up to this size (characters or bytes) are remembered once checked, with their version
    MEMO_BODY = 4096
    MEMO_SIZE = 2048

    def __init__(self, client_version: str, limits: Limits, check_expression: Callable[[str], str],
                 processors: frozenset[str] = inst_processors.allowed()):
        self.client_version = client_version
        self.limits = limits
        self.check_expression = check_expression
        self.processors = processors  # the inst_processors a request may name
        self._memo: dict[tuple, Request] = {}

    def parse(self, request_type: str, payload: Any) -> Request:
        """Decode, check and normalise one request event; raise :class:`RequestError` when it is bad.
        A hot request (the same short body and version as one checked before) is not checked again."""
        head, body = (payload.get("head"), payload.get("body")) if isinstance(payload, dict) else (None, None)
        memo_key = None
        if isinstance(head, dict) and isinstance(body, (str, bytes)) and len(body) <= self.MEMO_BODY:
            version = head.get("version")
            memo_key = (request_type, version, body) if isinstance(version, str) else None
        known = self._memo.get(memo_key) if memo_key is not None else None
        if known is not None:
            return known
        request = self._parse(request_type, payload)
        if memo_key is not None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            self._memo[memo_key] = request
        return request

    def _parse(self, request_type: str, payload: Any) -> Request:
        if request_type not in REQUEST_TYPES:
            raise RequestError(f"unknown request type {str(request_type)[:40]!r}")
        if not isinstance(payload, dict) or not isinstance(payload.get("head"), dict) or "body" not in payload:
            raise RequestError('a request is {"head": {"version": ...}, "body": ...}')
        version = check_version(payload["head"].get("version"), self.client_version)
        body = self._decode(payload["body"])
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a mapping, not {type(body).__name__}")
        args = getattr(self, f"_{request_type}")(body)
        return Request(request_type, args, request_key(request_type, args), version)

    def _decode(self, body: Any) -> Any:
        limit = self.limits.max_body_bytes
        if isinstance(body, (bytes, bytearray)):
            return safe_unpickle(bytes(body), limit)
        if isinstance(body, str):
            if len(body) > limit:
                raise RequestError(f"request body is {len(body)} characters, "
                                   f"over the limit of {limit} (the server's max_body_bytes)")
            try:
                return json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise RequestError(f"request body is not valid JSON: {str(exc)[:80]}") from None
        if isinstance(body, dict):
            return body
        raise RequestError(f"request body must be JSON text, a pickle or a mapping, not {type(body).__name__}")

    def _calendar(self, body: dict) -> dict:
        return {
            "start_time": _time(body.get("start_time"), "start_time"),
            "end_time": _time(body.get("end_time"), "end_time"),
            "freq": _freq(body.get("freq", "day")),
            "future": _flag(body.get("future", False), "future"),
        }

    def _market(self, conf: Any) -> dict:
        if not isinstance(conf, dict) or "market" not in conf:
            raise RequestError('instruments must be a market config {"market": ..., "filter_pipe": [...]}')
        unknown = set(conf) - {"market", "filter_pipe"}
        if unknown:
            raise RequestError(f"unknown keys in instruments config: {sorted(_key(k) for k in unknown)[:5]}")
        pipe = conf.get("filter_pipe") or []
        if not isinstance(pipe, (list, tuple)) or len(pipe) > 16:
            raise RequestError("filter_pipe must be a list of at most 16 filters")
        return {"market": _name(conf["market"], "market").lower(), "filter_pipe": [self._filter(f) for f in pipe]}

    def _filter(self, item: Any) -> dict:
        if (not isinstance(item, dict) or not isinstance(item.get("filter_type"), str)
                or item["filter_type"] not in _FILTERS):
            raise RequestError(f"a filter must be a dict with filter_type in {sorted(_FILTERS)}")
        kind = item["filter_type"]
        allowed = {"filter_type", "filter_start_time", "filter_end_time", *_FILTERS[kind]}
        if set(item) - allowed:
            raise RequestError(f"unknown keys in {kind}: {sorted(_key(k) for k in set(item) - allowed)[:5]}")
        out = {
            "filter_type": kind,
            "filter_start_time": _time(item.get("filter_start_time"), "filter_start_time"),
            "filter_end_time": _time(item.get("filter_end_time"), "filter_end_time"),
        }
        if kind == "NameDFilter":
            rule = item.get("name_rule_re")
            if not isinstance(rule, str) or len(rule) > 200:
                raise RequestError("name_rule_re must be a regular expression of at most 200 characters")
            try:
                re.compile(rule)
            except re.error as exc:
                raise RequestError(f"name_rule_re {rule!r} is not a regular expression: {exc}") from None
            out["name_rule_re"] = rule
        else:
            rule = item.get("rule_expression")
            if not isinstance(rule, str):
                raise RequestError("rule_expression must be a string")
            out["rule_expression"] = self.check_expression(rule)
            out["keep"] = _flag(item.get("keep", False), "keep")
        return out

    def _instrument(self, body: dict) -> dict:
        return {
            "instruments": self._market(body.get("instruments")),
            "start_time": _time(body.get("start_time"), "start_time"),
            "end_time": _time(body.get("end_time"), "end_time"),
            "freq": _freq(body.get("freq", "day")),
            "as_list": _flag(body.get("as_list", False), "as_list"),
        }

    def _codes(self, codes: Any) -> None:
        if not codes:
            raise RequestError("instruments must list at least one code")
        if len(codes) > self.limits.max_instruments:
            raise RequestError(f"instruments must list 1 to {self.limits.max_instruments} codes, got {len(codes)} "
                               "(the server's max_instruments)")

    def _spans(self, conf: dict) -> dict:
        """A dict of instrument codes and their ``(start, end)`` spans (what ``D.list_instruments`` returns),
        normalised as Qlib's cache key normalises it: codes in order, each one's spans sorted."""
        self._codes(conf)
        out = {}
        for code, spans in conf.items():
            code = _name(code, "instrument")
            if not isinstance(spans, (list, tuple)) or len(spans) > MAX_SPANS:
                raise RequestError(f"the spans of instrument {code} must be a list of at most {MAX_SPANS} "
                                   "(start, end) pairs")
            pairs = []
            for span in spans:
                if not isinstance(span, (list, tuple)) or len(span) != 2:
                    raise RequestError(f"a span of instrument {code} must be a (start, end) pair, not {_show(span)}")
                start, end = _time(span[0], f"a span's start of {code}"), _time(span[1], f"a span's end of {code}")
                if start is None or end is None:
                    raise RequestError(f"a span of instrument {code} must give both its start and its end")
                if pd.Timestamp(start) > pd.Timestamp(end):
                    raise RequestError(f"a span of instrument {code} starts ({start}) after it ends ({end})")
                pairs.append([start, end])
            out[code] = sorted(pairs)
        return dict(sorted(out.items()))

    def _feature(self, body: dict) -> dict:
        instruments = body.get("instruments")
        if isinstance(instruments, dict) and "market" in instruments:
            instruments = self._market(instruments)
        elif isinstance(instruments, dict):
            instruments = self._spans(instruments)
        elif isinstance(instruments, (list, tuple, set, frozenset, str)):
            codes = [instruments] if isinstance(instruments, str) else list(instruments)
            self._codes(codes)
            instruments = sorted({_name(c, "instrument") for c in codes})
        else:
            raise RequestError("instruments must be a market config or a list of instrument codes, or a dict of "
                               "codes and their (start, end) spans")
        fields = body.get("fields")
        if isinstance(fields, str):
            fields = [fields]
        if not isinstance(fields, (list, tuple)) or not fields:
            raise RequestError(f"fields must be a list of 1 to {self.limits.max_fields} expressions")
        if len(fields) > self.limits.max_fields:
            raise RequestError(f"fields must be a list of 1 to {self.limits.max_fields} expressions, got {len(fields)} "
                               "(the server's max_fields)")
        for field in fields:
            if not isinstance(field, str):
                raise RequestError(f"a field must be an expression string, not {type(field).__name__}")
            self.check_expression(field)
        disk_cache = body.get("disk_cache", 1)
        if disk_cache not in (0, 1) or isinstance(disk_cache, float):
            raise RequestError(f"disk_cache must be 0 or 1, got {_show(disk_cache)}")
        stream = body.get("stream", False)  # qlib_server.client streams the cache: it needs no HDF5 file
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false, got {_show(stream)}")
        start, end = _time(body.get("start_time"), "start_time"), _time(body.get("end_time"), "end_time")
        if start and end and start > end:
            raise RequestError(f"start_time {start} is after end_time {end}")
        processors = inst_processors.check(body.get("inst_processors"), self.processors)
        return {
            "instruments": instruments,
            "fields": list(fields),
            "start_time": start,
            "end_time": end,
            "freq": _freq(body.get("freq", "day")),
            "disk_cache": int(disk_cache),
            **({"stream": True} if stream else {}),
            **({"inst_processors": processors} if processors else {}),
        }


def request_key(request_type: str, args: dict) -> str:
    """Canonical key: equal for requests with the same answer, different otherwise. A feature request's answer
    (a dataset cache's URI, or the prepared expression cache) sorts its fields and covers the window of
    :func:`.dataset_keys.request_window` (``disk_cache=1``) or the whole history, so its key ignores the order of
    the fields and the dates outside it."""
    if request_type == "feature":
        window = dataset_keys.request_window(args) if args["disk_cache"] else (None, None)
        args = {**args, "start_time": window[0], "end_time": window[1],
                "fields": sorted(set(f.replace(" ", "") for f in args["fields"]))}
    text = json.dumps([request_type, args], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def response(result: Any = None, status: int = 0, detailed_info: str | None = None) -> dict:
    """The envelope every ``<type>_response`` event carries."""
    return {"result": result, "status": status, "detailed_info": detailed_info}


SHUTTING_DOWN = "the server is shutting down; retry on another server or in a moment"


def retry_later(status: int, info: str = SHUTTING_DOWN) -> dict:
    """The envelope of an answer that asks for the request again later (a draining server): it carries
    ``"retry": true``, which ``qlib_server.client`` acts on; the stock pyqlib client reads only ``status``
    and ``detailed_info``, and raises."""
    return {**response(None, status, info), "retry": True}


def request_id(payload: Any) -> str | None:
    """The id a client put in a request's head (``{"head": {"id": ...}}``, up to 64 characters), which
    its answer echoes so that concurrent requests on one connection are told apart; None without one."""
    head = payload.get("head") if isinstance(payload, dict) else None
    value = head.get("id") if isinstance(head, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def with_id(envelope: dict, rid: str | None) -> dict:
    """``envelope`` carrying the request id ``rid`` (unchanged without one: stock clients send none)."""
    return envelope if rid is None else {**envelope, "id": rid}
