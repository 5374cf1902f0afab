"""Figures of a run: latency percentiles per type, throughput, errors, dedup; as a table, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .universe import KINDS

OK = 0
PERCENTILES = (50, 90, 99)


class Rows:
    """All request rows of a run as arrays: type index, start (s after the start), latency (s), outcome,
    and lane index in :data:`LANES` (by default a calendar or instrument list is light)."""

    def __init__(self, kinds=(), starts=(), latencies=(), outcomes=(), lanes=None):
        self.kinds = np.asarray(kinds, dtype=np.int8)
        self.starts = np.asarray(starts, dtype=np.float64)
        self.latencies = np.asarray(latencies, dtype=np.float64)
        self.outcomes = np.asarray(outcomes, dtype=np.int8)
        self.lanes = (np.asarray(lanes, dtype=np.int8) if lanes is not None else
                      (self.kinds == KINDS.index("feature")).astype(np.int8))

    @classmethod
    def concat(cls, parts: list[dict]) -> Rows:
        return cls(*(np.concatenate([np.asarray(p[name], dtype=float) for p in parts]) if parts else []
                     for name in ("kinds", "starts", "latencies", "outcomes", "lanes")))

    def __len__(self) -> int:
        return len(self.kinds)


def percentiles(latencies_s, points=PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ms, ...}`` by linear interpolation between order statistics; None when there are no samples."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if values.size == 0:
        return {f"p{p}": None for p in points}
    return {f"p{p}": round(float(np.percentile(values, p)), 3) for p in points}


def latency_table(rows: Rows) -> dict[str, dict]:
    """Per type and overall: count of answered requests and their latency percentiles, mean and max (ms)."""
    out = {}
    ok = rows.outcomes == OK
    for name, mask in [*((k, ok & (rows.kinds == i)) for i, k in enumerate(KINDS)), ("all", ok)]:
        values = rows.latencies[mask]
        if values.size == 0 and name != "all":
            continue
        out[name] = {"count": int(values.size), **percentiles(values),
                     "mean": round(float(values.mean() * 1000), 3) if values.size else None,
                     "max": round(float(values.max() * 1000), 3) if values.size else None}
    return out


#: the server's task lanes: calendars and instrument lists without an ``ExpressionDFilter`` are computed
#: on ``<task_queue>.light``, everything else (features, expression filters) on the feature lane
LANES = ("light", "feature")


def lane_table(rows: Rows) -> dict[str, dict]:
    """Per lane (see :data:`LANES`): count of answered requests and their latency percentiles (ms)."""
    ok = rows.outcomes == OK
    out = {}
    for i, lane in enumerate(LANES):
        values = rows.latencies[ok & (rows.lanes == i)]
        if values.size:
            out[lane] = {"count": int(values.size), **percentiles(values)}
    return out


def histogram_quantiles(buckets: dict[float, float], points=PERCENTILES) -> dict[str, float | None]:
    """Percentiles (ms) from a Prometheus histogram's cumulative ``{upper bound (s): count}``, by linear
    interpolation inside the bucket (Prometheus' ``histogram_quantile``); the largest finite bound when
    a percentile falls in the ``+Inf`` bucket; None without samples."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    out = {}
    for p in points:
        if total <= 0:
            out[f"p{p}"] = None
            continue
        rank, lower, below = total * p / 100.0, 0.0, 0.0
        for bound in bounds:
            count = buckets[bound]
            if count >= rank:
                if bound == float("inf"):
                    value = lower
                else:
                    value = lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
                break
            lower, below = (bound if bound != float("inf") else lower), count
        out[f"p{p}"] = round(value * 1000.0, 3)
    return out


def server_view(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """The server's own latency percentiles per type over the run, from the difference of its
    ``qlib_server_request_seconds`` histogram (``{type: {bound: count}}``) before and after."""
    out = {}
    for kind in sorted(after):
        buckets = {b: after[kind][b] - before.get(kind, {}).get(b, 0.0) for b in after[kind]}
        if buckets and max(buckets.values()) > 0:
            out[kind] = {"count": int(max(buckets.values())), **histogram_quantiles(buckets)}
    return out


def throughput(rows: Rows, elapsed: float) -> float:
    """Requests answered (any outcome) per second of the run."""
    return round(len(rows) / elapsed, 2) if elapsed > 0 else 0.0


def dedup_ratio(tasks_published: float, requests: float) -> float | None:
    """Share of requests that caused no task of their own: 1 - tasks_published / requests."""
    return round(1.0 - tasks_published / requests, 4) if requests > 0 else None


def print_table(summary: dict) -> None:
    """The run's figures on the terminal, with ``rich`` when it is installed."""
    head = [("requests", summary["requests"]), ("errors", summary["errors"]),
            ("wrong answers", summary["wrong_answers"]), ("throughput (req/s)", summary["throughput"]),
            ("tasks published", summary["tasks_published"]), ("dedup ratio", summary["dedup_ratio"]),
            ("clients", summary["clients"]), ("duration (s)", summary["duration"]),
            ("verified distinct answers", summary["verified_answers"])]
    columns = ["type", "count", "p50 ms", "p90 ms", "p99 ms", "mean ms", "max ms"]
    lines = [[k, v["count"], v["p50"], v["p90"], v["p99"], v["mean"], v["max"]] for k,
             v in summary["latency_ms"].items()]
    for name, stats in (summary.get("pyqlib") or {}).get("latency_ms", {}).items():
        lines.append([f"pyqlib {name}", stats["count"], stats["p50"], stats["p90"], stats["p99"], stats["mean"],
                      stats["max"]])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for name, value in head:
            print(f"{name:>26}: {value}")
        print("  ".join(f"{c:>12}" for c in columns))
        for line in lines:
            print("  ".join(f"{_fmt(c):>12}" for c in line))
    else:
        console = Console()
        overview = Table(title="qlib-server simulation", show_header=False)
        for name, value in head:
            overview.add_row(name, _fmt(value))
        console.print(overview)
        table = Table(title="latency of answered requests")
        for c in columns:
            table.add_column(c, justify="right")
        for line in lines:
            table.add_row(*map(_fmt, line))
        console.print(table)
    for title, table in (("by lane (client side)", summary.get("lanes")),
                         ("the server's view (/metrics histogram)", summary.get("server_view"))):
        if table:
            print(f"latency {title}:")
            for name, v in table.items():
                print(f"  {name:>12}  n={v['count']:<8} p50 {_fmt(v['p50'])} ms  p90 {_fmt(v['p90'])} ms  "
                      f"p99 {_fmt(v['p99'])} ms")
    for message, count in summary.get("error_samples", [])[:10]:
        print(f"error x{count}: {message}")
    for message in summary.get("wrong_samples", [])[:10]:
        print(f"WRONG: {message}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def write_json(summary: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def plot(rows: Rows, path: str | Path, title: str = "", pyqlib_latencies: dict[str, list] | None = None,
         duration: float | None = None) -> None:
    """Latency CDF and histogram per type, and answers per second over the run (load ends at ``duration``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, hist, rate) = plt.subplots(1, 3, figsize=(18, 5))
    ok = rows.outcomes == OK
    positive = rows.latencies[ok & (rows.latencies > 0)] * 1000
    low, high = (max(positive.min(), 1e-2), positive.max() * 1.01) if positive.size else (0.1, 1000)
    extra = {f"pyqlib {k}": np.asarray(v, dtype=float) * 1000 for k, v in (pyqlib_latencies or {}).items() if v}
    bins = np.logspace(np.log10(low), np.log10(max(high, *(v.max() for v in extra.values()), low * 10)), 60)
    series = {k: rows.latencies[ok & (rows.kinds == i)] * 1000 for i, k in enumerate(KINDS)}
    for name, values in {**series, **extra}.items():
        if values.size == 0:
            continue
        ordered = np.sort(values)
        cdf.plot(ordered, np.arange(1, ordered.size + 1) / ordered.size, label=f"{name} (n={ordered.size})")
        hist.hist(values, bins=bins, histtype="step", label=name)
    for axis in (cdf, hist):
        axis.set_xscale("log")
        axis.set_xlabel("latency (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    cdf.set_ylabel("fraction of answered requests")
    cdf.set_title("latency CDF per type")
    hist.set_ylabel("requests")
    hist.set_title("latency histogram per type")
    ends = rows.starts + rows.latencies
    span = int(np.ceil(ends.max())) + 1 if ends.size else 1
    edges = np.arange(0, span + 1)
    for i, kind in enumerate(KINDS):
        counts, _ = np.histogram(ends[ok & (rows.kinds == i)], bins=edges)
        if counts.any():
            rate.plot(edges[:-1], counts, label=kind)
    total, _ = np.histogram(ends[ok], bins=edges)
    rate.plot(edges[:-1], total, label="all answered", color="black")
    failed, _ = np.histogram(ends[~ok], bins=edges)
    if failed.any():
        rate.plot(edges[:-1], failed, label="errors", color="red")
    if duration:
        rate.axvline(duration, color="grey", linestyle="--", label="end of load")
    rate.set_xlabel("seconds since start")
    rate.set_ylabel("answers per second")
    rate.set_title("throughput over time")
    rate.grid(True, alpha=0.3)
    rate.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
