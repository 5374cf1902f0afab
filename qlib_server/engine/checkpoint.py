"""The checkpoint of a request's fields computed over ``[start, end]``: what :func:`.features.extend_blocks` needs
to compute the rows that change when days are appended after ``end`` (see :mod:`.incremental`).

Stored as a NumPy ``.npz`` archive (no pickle: arrays, and the structure as JSON text in a uint8 array).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

FORMAT = 1


@dataclass
class Group:
    """The fields one evaluator computed (``fields``: their indexes in the request), over the query range
    ``extent`` (calendar positions), and per node key what an extension of it needs."""

    extent: tuple
    fields: list
    records: dict = field(default_factory=dict)


@dataclass
class BlockCheckpoint:
    """One block of instruments; ``unsupported`` says why it cannot be extended (None: it can)."""

    instruments: list
    groups: list
    unsupported: Optional[str] = None


@dataclass
class Checkpoint:
    """The fields ``names`` over calendar positions ``[start, end]``, block by block."""

    names: list
    start: int
    end: int
    blocks: list

    @property
    def nbytes(self) -> int:
        """The bytes of its arrays."""
        return sum(a.nbytes for b in self.blocks for g in b.groups for r in g.records.values() for a in r.values())

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.save(out)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        return cls.load(io.BytesIO(data))

    def save(self, file: Union[str, Path, BinaryIO]) -> None:
        """Written as an ``.npz`` archive (a path or a binary file): the structure as JSON, and the arrays of
        each dtype one after the other in one array (a few members to read, however many nodes)."""
        packed: dict[str, list] = {}  # dtype -> [flat arrays, size so far]
        blocks = []
        for block in self.blocks:
            groups = []
            for group in block.groups:
                nodes = []
                for key, record in group.records.items():
                    arrays = {}
                    for what, array in sorted(record.items()):
                        array = np.asarray(array)
                        kind = array.dtype.str
                        pieces = packed.setdefault(kind, [[], 0])
                        arrays[what] = [kind, pieces[1], list(array.shape)]
                        pieces[0].append(array.ravel())
                        pieces[1] += array.size
                    nodes.append([key, arrays])
                groups.append({"extent": [int(v) for v in group.extent], "fields": [int(f) for f in group.fields],
                               "nodes": nodes})
            blocks.append({"instruments": list(block.instruments), "unsupported": block.unsupported,
                           "groups": groups})
        dtypes = sorted(packed)
        meta = {"format": FORMAT, "names": list(self.names), "start": int(self.start), "end": int(self.end),
                "blocks": blocks, "dtypes": dtypes}
        members = {f"a{i}": np.concatenate(packed[kind][0]) for i, kind in enumerate(dtypes)}
        members["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(file, **members)  # type: ignore[arg-type]

    @classmethod
    def load(cls, file: Union[str, Path, BinaryIO]) -> Checkpoint:
        """Read what :meth:`save` wrote."""
        with np.load(file, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"checkpoint format {meta.get('format')}, not {FORMAT}")
            flat = {kind: archive[f"a{i}"] for i, kind in enumerate(meta["dtypes"])}
        blocks = []
        for block in meta["blocks"]:
            groups = []
            for group in block["groups"]:
                records = {}
                for key, arrays in group["nodes"]:
                    records[key] = {what: _view(flat[kind], offset, shape)
                                    for what, (kind, offset, shape) in arrays.items()}
                groups.append(Group(tuple(group["extent"]), list(group["fields"]), records))
            blocks.append(BlockCheckpoint(block["instruments"], groups, block["unsupported"]))
        return cls(meta["names"], meta["start"], meta["end"], blocks)


def _view(flat: np.ndarray, offset: int, shape: list) -> np.ndarray:
    size = int(np.prod(shape)) if shape else 1
    view = flat[offset:offset + size].reshape(shape)
    view.flags.writeable = False
    return view
