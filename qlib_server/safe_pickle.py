"""Unpickling a request body from a client (released pyqlib 0.9.x pickles it) without running its code.

A pickle may name any importable callable; only containers, scalars, dates and times are allowed here, and the
opcodes are walked first, without running them, to refuse memo slots beyond what the pickle could fill.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any

from .errors import RequestError

# Everything a pickled request body may refer to: containers, scalars, dates and times.
_PICKLE_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise RequestError(f"pickled body refers to {str(module)[:60]}.{str(name)[:60]}, "
                           "which a request may not contain")


def _show(value: Any) -> str:
    """A memo slot for an error message: a small number, a short prefix of a string, else its type."""
    if isinstance(value, str):
        return repr(value[:40])
    return repr(value) if isinstance(value, int) and abs(value) < 10**18 else f"a {type(value).__name__}"


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without running them: refuse memo slots beyond what the pickle could fill."""
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data), 1):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= count):
                raise RequestError(f"request body is not a valid pickle: memo slot {_show(arg)} out of range")
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"request body is not a valid pickle: {type(exc).__name__}: {str(exc)[:80]}") from None


def safe_unpickle(data: bytes, max_bytes: int) -> Any:
    """Unpickle ``data`` allowing only the types a request can hold; refuse anything else."""
    if len(data) > max_bytes:
        raise RequestError(f"request body is {len(data)} bytes, over the limit of {max_bytes} "
                           "(the server's max_body_bytes)")
    _check_opcodes(data)
    try:
        return _AllowListUnpickler(io.BytesIO(data)).load()
    except RequestError:
        raise
    except Exception as exc:  # pickle raises many types on junk input
        raise RequestError(f"request body is not a valid pickle: {type(exc).__name__}: {str(exc)[:80]}") from None
