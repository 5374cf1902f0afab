"""The requests fake clients send: drawn from the dataset on disk, with a tunable overlap between clients.

A :class:`Universe` is a finite, seeded list of distinct requests per type; every worker process builds
the same one from the same seed, so popular requests collide across processes. A :class:`Sampler`
draws from it: ``zipf:S`` (rank ``i`` has weight ``1/i**S``), ``uniform``, or ``unique`` (every draw is
a request the server has never been asked in this run; workers split the space by hash).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("calendar", "instrument", "feature")

FIELD_POOL = (
    "$close", "$open", "$high", "$low", "$volume", "$vwap", "$change",
    "Mean($close, 5)", "Mean($close, 20)", "Ref($close, 1)/$close - 1", "Std($volume, 20)",
    "$close/$open - 1", "Max($high, 10)", "Min($low, 10)", "Corr($close, $volume, 10)",
    "EMA($close, 12)", "Rank($close, 10)", "Sum($volume, 5)", "($high - $low)/$close", "Delta($close, 3)",
    "Std($close, 60)",
)

FILTER_PIPES = (
    [],
    [{"filter_type": "NameDFilter", "name_rule_re": "SH[0-9]+", "filter_start_time": None, "filter_end_time": None}],
    [{"filter_type": "ExpressionDFilter", "rule_expression": "$close>10", "filter_start_time": None,
      "filter_end_time": None, "keep": False}],
    [{"filter_type": "NameDFilter", "name_rule_re": "SZ[0-9]+", "filter_start_time": None, "filter_end_time": None},
     {"filter_type": "ExpressionDFilter", "rule_expression": "Mean($volume, 5)>400000", "filter_start_time": None,
      "filter_end_time": None, "keep": True}],
)


@dataclass(frozen=True)
class Dataset:
    """What the generator needs to know of a Qlib dataset: its daily calendar, markets and codes."""

    calendar: list[str]
    markets: dict[str, list[str]]
    codes: list[str]

    @classmethod
    def load(cls, root: str | Path) -> Dataset:
        """Read ``calendars/day.txt`` and ``instruments/*.txt`` under ``root``."""
        root = Path(root)
        calendar = [line.strip() for line in (root / "calendars" / "day.txt").read_text().splitlines() if line.strip()]
        markets = {}
        for path in sorted((root / "instruments").glob("*.txt")):
            codes = {line.split("\t")[0].strip() for line in path.read_text().splitlines() if line.strip()}
            markets[path.stem.lower()] = sorted(codes)
        if not calendar or not markets:
            raise ValueError(f"{root} is not a Qlib dataset (no calendar or no instruments)")
        codes = markets.get("all") or sorted({c for m in markets.values() for c in m})
        return cls(calendar, markets, codes)


def request_id(kind: str, body: dict) -> str:
    """Identity of one exact request (its answer may differ from any other's)."""
    return hashlib.sha1(json.dumps([kind, body], sort_keys=True).encode()).hexdigest()


def server_key(kind: str, body: dict) -> str:
    """Identity of the work the server does: a feature's cache ignores dates and the order and spaces of fields."""
    if kind == "feature":
        instruments = body["instruments"]
        body = {"instruments": sorted(set(instruments)) if isinstance(instruments, list) else instruments,
                "fields": sorted({f.replace(" ", "") for f in body["fields"]}),
                "freq": body.get("freq", "day"), "disk_cache": body.get("disk_cache", 1)}
    return request_id(kind, body)


@dataclass(frozen=True)
class Request:
    """One request: its type, body (plain JSON values), identity and the server's dedup identity."""

    kind: str
    body: dict
    id: str = field(compare=False)
    work: str = field(compare=False)

    @classmethod
    def make(cls, kind: str, body: dict) -> Request:
        return cls(kind, body, request_id(kind, body), server_key(kind, body))

    @property
    def light(self) -> bool:
        """Whether the server computes it on its light lane: a calendar, or an instrument list whose
        filters evaluate no expression."""
        if self.kind != "instrument":
            return self.kind == "calendar"
        market = self.body.get("instruments")
        pipe = market.get("filter_pipe") or [] if isinstance(market, dict) else []
        return not any(f.get("filter_type") == "ExpressionDFilter" for f in pipe)


class RequestGenerator:
    """Random valid requests of each type over a dataset."""

    def __init__(self, dataset: Dataset, feature_markets: tuple[str, ...] = ("all", "csi300", "csi100")):
        self.data = dataset
        self.markets = [m for m in ("all", "csi300", "csi100") if m in dataset.markets] or sorted(dataset.markets)
        self.feature_markets = [m for m in feature_markets if m in dataset.markets] or self.markets

    def _dates(self, rng: random.Random, open_ended: float = 0.2) -> tuple[str | None, str | None]:
        cal = self.data.calendar
        a, b = sorted(rng.sample(range(len(cal)), 2)) if len(cal) > 1 else (0, 0)
        start = None if rng.random() < open_ended else cal[a]
        end = None if rng.random() < open_ended else cal[b]
        return start, end

    def calendar(self, rng: random.Random) -> Request:
        start, end = self._dates(rng)
        return Request.make("calendar", {"start_time": start, "end_time": end, "freq": "day", "future": False})

    def instrument(self, rng: random.Random) -> Request:
        start, end = self._dates(rng)
        market = {"market": rng.choice(self.markets), "filter_pipe": rng.choice(FILTER_PIPES)}
        return Request.make("instrument", {"instruments": market, "start_time": start, "end_time": end,
                                           "freq": "day", "as_list": rng.random() < 0.5})

    def feature(self, rng: random.Random) -> Request:
        start, end = self._dates(rng, open_ended=0.3)
        if rng.random() < 0.3:
            instruments = {"market": rng.choice(self.feature_markets), "filter_pipe": rng.choice(FILTER_PIPES[:2])}
        else:
            instruments = rng.sample(self.data.codes, rng.randint(1, min(8, len(self.data.codes))))
        fields = rng.sample(FIELD_POOL, rng.randint(1, 4))
        return Request.make("feature", {"instruments": instruments, "fields": fields, "start_time": start,
                                        "end_time": end, "freq": "day", "disk_cache": 1})

    def draw(self, kind: str, rng: random.Random) -> Request:
        return getattr(self, kind)(rng)


class Universe:
    """A finite list of requests per type, distinct by the work they cause on the server, most popular first."""

    def __init__(self, dataset: Dataset, size: int = 200, seed: int = 0):
        self.generator = RequestGenerator(dataset)
        rng = random.Random(seed)
        self.requests: dict[str, list[Request]] = {}
        for kind in KINDS:
            seen, items = set(), []
            for _ in range(size * 50):
                req = self.generator.draw(kind, rng)
                if req.work not in seen:
                    seen.add(req.work)
                    items.append(req)
                    if len(items) == size:
                        break
            self.requests[kind] = items


def parse_mix(text: str) -> dict[str, float]:
    """``calendar=0.2,instrument=0.3,feature=0.5`` → normalised weights per type."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in KINDS:
            raise ValueError(f"unknown request type {name!r} in mix (types: {', '.join(KINDS)})")
        weights[name.strip()] = float(value)
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"mix {text!r} needs non-negative weights with a positive sum")
    return {k: w / total for k, w in weights.items() if w > 0}


def parse_overlap(text: str) -> tuple[str, float]:
    """``zipf:1.2`` → ("zipf", 1.2); ``uniform`` / ``unique`` → (name, 0)."""
    name, _, param = text.partition(":")
    if name == "zipf":
        exponent = float(param or 1.2)
        if exponent <= 0:
            raise ValueError("zipf exponent must be positive")
        return name, exponent
    if name in ("uniform", "unique") and not param:
        return name, 0.0
    raise ValueError(f"overlap must be zipf:S, uniform or unique, not {text!r}")


class Sampler:
    """Draws requests for one worker: type by ``mix``, request by ``overlap``.

    In ``unique`` mode worker ``shard`` of ``shards`` keeps only requests whose server work hashes to it,
    and never draws the same work twice, so no two draws in the whole run collide.
    """

    def __init__(self, universe: Universe, overlap: str = "zipf:1.2", mix: dict[str, float] | None = None,
                 seed: int = 0, shard: int = 0, shards: int = 1):
        self.universe = universe
        self.mode, exponent = parse_overlap(overlap)
        self.mix = mix or {"calendar": 0.2, "instrument": 0.3, "feature": 0.5}
        self.kinds = list(self.mix)
        self.kind_cum = _cumulative([self.mix[k] for k in self.kinds])
        self.rng = random.Random(seed * 1_000_003 + shard)
        self.shard, self.shards = shard, shards
        self.seen: set[str] = set()
        self.cum = {kind: _cumulative([1 / (i + 1) ** exponent if self.mode == "zipf" else 1.0
                                       for i in range(len(reqs))])
                    for kind, reqs in universe.requests.items()}

    def kind(self) -> str:
        return self.kinds[_pick(self.kind_cum, self.rng.random())]

    def draw(self, kind: str | None = None) -> Request:
        kind = kind or self.kind()
        if self.mode == "unique":
            return self._fresh(kind)
        return self.universe.requests[kind][_pick(self.cum[kind], self.rng.random())]

    def _fresh(self, kind: str) -> Request:
        for _ in range(100_000):
            req = self.universe.generator.draw(kind, self.rng)
            if req.work not in self.seen and int(req.work[:8], 16) % self.shards == self.shard:
                self.seen.add(req.work)
                return req
        raise RuntimeError(f"no unseen {kind} request left in the request space")


def _cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return [x / total for x in out]


def _pick(cumulative: list[float], u: float) -> int:
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)
