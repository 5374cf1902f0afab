"""The daily update of a computed request: its checkpoint taken by the full computation
(:func:`.features.blocks` with ``checkpoint=True``), and its extension to a later last day
(:func:`.features.extend_blocks`), block by block. :mod:`.incremental` says what is covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .checkpoint import BlockCheckpoint, Checkpoint, Group
from .incremental import Extender, Recorder
from .parts import cut
from .plan import Plan, look_ahead, plan
from .values import Unsupported


@dataclass
class Prepared:
    """The fields' evaluators (query range -> the fields' indexes) and their plans for data ending at ``end``;
    ``first`` is the first calendar position whose rows appending days may change; ``reason`` why the request
    cannot be extended (None: it can)."""

    groups: dict
    plans: dict
    first: int
    reason: Optional[str] = None


def first_changed(expressions: list, start: int, end: int, aheads: Optional[list] = None) -> int:
    """The first calendar position of ``[start, ...]`` whose values appending days after ``end`` can change
    (``aheads``: the expressions' look-aheads, when known)."""
    aheads = look_ahead(expressions) if aheads is None else aheads
    return max(start, min((end + 1 - ahead for ahead in aheads), default=end + 1))


def prepare(names: list, expressions: list, extents: list, start: int, end: int) -> Prepared:
    """The plans of the full computation of ``names`` (``extents``: each field's query range, None where the
    engine cannot compute it) over ``[start, end]``."""
    groups: dict = {}
    for c, extent in enumerate(extents):
        groups.setdefault(extent, []).append(c)
    prepared = Prepared(groups, {}, end + 1)
    if None in groups:
        prepared.reason = f"no query range for {names[groups[None][0]]}"
        return prepared
    try:
        prepared.first = first_changed(expressions, start, end)
        for extent, fields in groups.items():
            prepared.plans[extent] = _plan(expressions, fields, extent[0], end, prepared.first)
    except Unsupported as reason:
        prepared.reason = str(reason)
    return prepared


def _plan(expressions: list, fields: list, offset: int, end: int, first: int) -> Plan:
    return plan([expressions[c] for c in fields], end + 1 - offset, first - offset)


def recorder(prepared: Prepared, chunk: list, extent: tuple, read: Callable) -> Optional[Recorder]:
    """The evaluator recording the checkpoint of ``chunk``'s fields over ``extent`` (None: nothing to record)."""
    found = prepared.plans.get(extent)
    return None if found is None else Recorder(chunk, extent[0], extent[1], read, found)


def block_checkpoint(prepared: Prepared, chunk: list, evaluators: dict, fallback: Optional[str]) -> BlockCheckpoint:
    """What the full computation of one block recorded (``fallback``: why a field of it was left to Qlib)."""
    reason = prepared.reason or (f"a field was left to Qlib: {fallback}" if fallback else None)
    groups = []
    if reason is None:
        for extent, fields in prepared.groups.items():
            evaluator = evaluators.get(extent)
            groups.append(Group(extent, list(fields), dict(evaluator.records) if evaluator is not None else {}))
    return BlockCheckpoint(list(chunk), groups, reason)


def extend(saved: Checkpoint, end: int, expressions: list) -> tuple:
    """The old and the new plans of every group of ``saved`` extended to ``end``, and the first changed row."""
    if end < saved.end:
        raise ValueError(f"the data end at {end}, before the checkpoint's {saved.end}")
    aheads = look_ahead(expressions)
    first = first_changed(expressions, saved.start, saved.end, aheads)
    then = first_changed(expressions, saved.start, end, aheads)
    plans: dict = {}
    for block in saved.blocks:
        if block.unsupported:
            raise Unsupported(block.unsupported)
        for group in block.groups:
            extent, key = tuple(group.extent), tuple(group.fields)
            if (extent, key) not in plans:
                plans[extent, key] = (_plan(expressions, group.fields, extent[0], saved.end, first),
                                      _plan(expressions, group.fields, extent[0], end, then))
    return plans, first


def extend_block(block: BlockCheckpoint, plans: dict, expressions: list, read: Callable, old_end: int, end: int,
                 first: int) -> tuple[list, list, BlockCheckpoint]:
    """One block's fields on calendar positions ``[first, end]`` (values, index entries) computed from its
    checkpoint and the data now ending at ``end``, and its next checkpoint."""
    k = end - old_end
    n = len(expressions)
    values: list = [None] * n
    present: list = [None] * n
    groups = []
    for group in block.groups:
        offset, query_end = group.extent
        before, after = plans[tuple(group.extent), tuple(group.fields)]
        extender = Extender(block.instruments, offset, query_end + k - offset, read, before, after, group.records)
        later = _later(before, [expressions[c] for c in group.fields])
        for c, keep in zip(group.fields, later):
            values[c], present[c] = cut(extender.part(expressions[c]), first - offset, end - offset)
            for key in [key for key in extender.memo if key not in keep]:  # only what later fields read
                del extender.memo[key]
        groups.append(Group((offset, query_end + k), list(group.fields), extender.records))
    if any(v is None for v in values):
        raise Unsupported("a field is in no group of the checkpoint")
    return values, present, BlockCheckpoint(list(block.instruments), groups)


def _later(planned: Plan, roots: list) -> list:
    """For each of ``roots``, the keys of the nodes the roots after it read."""
    def reach(key: str, into: set) -> None:
        if key in into:
            return
        into.add(key)
        for operand in planned.nodes[key].inputs:
            if operand is not None and planned.ids.get(id(operand)) is not None:
                reach(planned.ids[id(operand)], into)

    later: list = [set()]
    for root in reversed(roots[1:]):
        keys = set(later[-1])
        reach(planned.key(root), keys)
        later.append(keys)
    later.reverse()
    return later


def merge(blocks: list) -> BlockCheckpoint:
    """One block of the instruments of ``blocks`` (checkpoints of the same request), rows one after the other."""
    for block in blocks:
        if block.unsupported:
            raise Unsupported(block.unsupported)
    groups = []
    for g, group in enumerate(blocks[0].groups):
        records = {key: {what: np.concatenate([b.groups[g].records[key][what] for b in blocks])
                         for what in record} for key, record in group.records.items()}
        groups.append(Group(group.extent, group.fields, records))
    return BlockCheckpoint([i for b in blocks for i in b.instruments], groups)


def split(block: BlockCheckpoint, rows: slice) -> BlockCheckpoint:
    """The checkpoint of ``block``'s instruments ``rows``."""
    groups = [Group(g.extent, g.fields, {key: {what: a[rows] for what, a in record.items()}
                                         for key, record in g.records.items()}) for g in block.groups]
    return BlockCheckpoint(block.instruments[rows], groups)
