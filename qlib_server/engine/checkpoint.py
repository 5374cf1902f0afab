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
        """Written as an ``.npz`` archive (a path or a binary file)."""
        arrays: dict = {}
        blocks = []
        for b, block in enumerate(self.blocks):
            groups = []
            for g, group in enumerate(block.groups):
                nodes = []
                for n, (key, record) in enumerate(group.records.items()):
                    nodes.append([key, sorted(record)])
                    for what, array in record.items():
                        arrays[f"b{b}.g{g}.n{n}.{what}"] = np.asarray(array)
                groups.append({"extent": [int(v) for v in group.extent], "fields": [int(f) for f in group.fields],
                               "nodes": nodes})
            blocks.append({"instruments": list(block.instruments), "unsupported": block.unsupported,
                           "groups": groups})
        meta = {"format": FORMAT, "names": list(self.names), "start": int(self.start), "end": int(self.end),
                "blocks": blocks}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(file, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, file: Union[str, Path, BinaryIO]) -> Checkpoint:
        """Read what :meth:`save` wrote."""
        with np.load(file, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"checkpoint format {meta.get('format')}, not {FORMAT}")
            blocks = []
            for b, block in enumerate(meta["blocks"]):
                groups = []
                for g, group in enumerate(block["groups"]):
                    records = {key: {what: archive[f"b{b}.g{g}.n{n}.{what}"] for what in whats}
                               for n, (key, whats) in enumerate(group["nodes"])}
                    groups.append(Group(tuple(group["extent"]), list(group["fields"]), records))
                blocks.append(BlockCheckpoint(block["instruments"], groups, block["unsupported"]))
        return cls(meta["names"], meta["start"], meta["end"], blocks)
