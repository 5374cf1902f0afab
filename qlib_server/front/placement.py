"""Where a feature request's rows lie in its dataset cache's files: the answer to
``POST /features?delivery=files``, for a client on the server's own host.

Such a client maps the segment files (:mod:`qlib_server.state.records`) and builds its frame on them, so
the values are neither sent nor copied: a frame of all of a cache's rows is a view of the file, which the
worker has just written to the page cache (see :mod:`qlib_server.client.placed`). Segment files are written
once under a new name and never changed, so a mapping holds the rows it was answered for; each file is named
with its device, inode, size and mtime, and the client maps only the very file it was told of. Where it
cannot (another host that has no such file, a cache replaced in between, no permission), it asks for the
stream instead.

The answer (its ``result``): ``rows``; ``instruments``, ``[code, rows]`` by code, as the stream's schema;
``unit`` of the ``datetime`` section; ``files``, each segment file the pieces read, as
``{"path", "identity", "values", "stride"}`` (its absolute path, the byte where its values begin, a column's
room in rows); ``columns``, the position of each requested column (named
in ``names``) in a row's values; ``pieces``, ``[file, first, last]``: rows of a file, in the frame's order.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .transfer import Layout, Selection


def placement(where: Layout, columns: list[str], selection: Selection) -> dict:
    """The placement of the ``selection``'s rows and ``columns`` in the cache's files (see the module)."""
    used = list({id(segment): segment for segment, _, _ in selection.pieces}.values())
    number = {id(segment): i for i, segment in enumerate(used)}
    return {
        "rows": selection.rows,
        "instruments": [[code, int(n)] for code, n in zip(where.records.codes, selection.counts.tolist()) if n],
        "unit": where.records.unit,
        "files": [{"path": os.path.abspath(s.file), "identity": list(s.identity), "values": s.values_at,
                   "stride": s.stride} for s in used],
        "names": columns,
        "columns": [where.position[column] for column in columns],
        "pieces": [[number[id(segment)], first, last] for segment, first, last in selection.pieces],
    }
