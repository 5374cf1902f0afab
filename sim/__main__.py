"""``python -m sim``: many fake Qlib clients against a running qlib-server, every answer checked afterwards.

Example::

    python -m sim --server http://127.0.0.1:9720 --data /tmp/simdata --clients 200 --duration 20 \\
        --overlap zipf:1.2 --mix calendar=0.2,instrument=0.3,feature=0.5 --json /tmp/sim.json --plot /tmp/sim.png

Exit status: 0 when every request was answered correctly, 1 on errors or wrong answers, 2 when the run
could not start.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import time

from .client import fetch_metrics, metric_by_type
from .pyqlib_driver import PyqlibDrivers
from .report import Rows, dedup_ratio, lane_table, latency_table, plot, print_table, server_view, throughput, write_json
from .universe import Dataset, parse_mix, parse_overlap
from .verify import verify_answers
from .worker import OK, TIMEOUT, WorkerSpec, worker_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="qlib-server URL, e.g. http://127.0.0.1:9710")
    p.add_argument("--data", required=True, help="the server's provider_uri, mounted here too (for the verifier)")
    p.add_argument("--clients", type=int, default=50, help="fake clients (one connection each)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--overlap", default="zipf:1.2", help="zipf:S | uniform | unique")
    p.add_argument("--mix", default="calendar=0.2,instrument=0.3,feature=0.5", help="share of each request type")
    p.add_argument("--encoding", default="mixed", choices=("json", "pickle", "mixed"), help="request body encoding")
    p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1), help="load-generating processes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as an error")
    p.add_argument("--universe", type=int, default=200, help="distinct requests per type (zipf and uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pyqlib", type=int, default=0, metavar="K", help="also run K real pyqlib client processes")
    p.add_argument("--verify-processes", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-verify", action="store_true", help="skip checking answers (wrong_answers is then null)")
    p.add_argument("--cache-dir-name", default="dataset_cache", help="the server's dataset_cache_dir_name")
    p.add_argument("--token", default=os.environ.get("QLIB_SERVER_TOKEN"),
                   help="the server's auth_token (default $QLIB_SERVER_TOKEN), for clients and /metrics")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write latency and throughput plots")
    args = p.parse_args(argv)
    try:
        parse_overlap(args.overlap)
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(str(exc))
    if args.clients < 1 or args.duration <= 0 or args.processes < 1:
        p.error("--clients, --duration and --processes must be positive")
    args.processes = min(args.processes, args.clients)
    return args


SERVER_COUNTERS = ("tasks_published", "requests", "dedup_hits", "cache_hits", "request_timeouts")


def _server_counters(server: str, token: str | None = None) -> dict[str, dict] | None:
    """The server's counters this report uses, per type (an absent counter reads as zero), and under
    ``latency`` its request-latency histogram as ``{type: {upper bound: cumulative count}}``."""
    try:
        metrics = fetch_metrics(server, token=token)
    except OSError:
        return None
    out = {name: metric_by_type(metrics, f"qlib_server_{name}_total") for name in SERVER_COUNTERS}
    latency: dict[str, dict] = {}
    for labels, value in metrics.get("qlib_server_request_seconds_bucket", {}).items():
        named = dict(labels)
        latency.setdefault(named.get("type", ""), {})[float(named["le"])] = value
    out["latency"] = latency
    return out


def _delta(after: dict, before: dict) -> dict[str, int]:
    return {k: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(set(after) | set(before))}


def _wait_events(events, want: str, count: int, timeout: float, on_item=None) -> list:
    items, end = [], time.time() + timeout
    while len(items) < count:
        try:
            kind, index, data = events.get(timeout=max(0.1, min(0.5, end - time.time())))
        except queue.Empty:
            if time.time() > end:
                raise TimeoutError(f"only {len(items)} of {count} workers reported {want!r}") from None
            continue
        if kind == "failed":
            raise RuntimeError(f"worker {index} failed: {data}")
        if kind == want:
            items.append((index, data))
            if on_item:
                on_item(index, data)
    return items


def run(args) -> dict:
    """Drive the load, collect and verify; return the summary."""
    from tqdm import tqdm

    Dataset.load(args.data)  # fail early on a wrong path
    base = _server_counters(args.server, args.token)
    if base is None:
        raise ConnectionError(f"cannot GET {args.server}/metrics: is the server running?")
    ctx = multiprocessing.get_context("spawn")
    events, go = ctx.Queue(), ctx.Event()
    clock = ctx.Array("d", [0.0, 0.0], lock=False)
    progress = ctx.Array("q", 2 * args.processes, lock=False)
    drivers = PyqlibDrivers(args.pyqlib, args.server, args.data, args.timeout)
    workers = []
    try:
        drivers.start()
        for i in range(args.processes):
            spec = WorkerSpec(i, args.processes, args.server, args.data, args.clients // args.processes +
                              (i < args.clients % args.processes), args.overlap, tuple(args.mix_weights.items()),
                              args.encoding, args.universe, args.seed, args.timeout, token=args.token)
            proc = ctx.Process(target=worker_main, args=(spec, events, go, clock, progress), daemon=True)
            proc.start()
            workers.append(proc)
        ready = _wait_events(events, "ready", args.processes, 120 + args.clients * 0.2)
        print(f"{sum(n for _, n in ready)} of {args.clients} clients connected", file=sys.stderr)
        drivers.wait_ready()
        before = _server_counters(args.server, args.token) or base
        clock[0] = start = time.time()
        clock[1] = start + args.duration
        go.set()
        drivers.go(start + args.duration)
        results = []
        with tqdm(total=round(args.duration), unit="s", desc="load", file=sys.stderr) as bar:
            def on_done(index, data):
                results.append(data)
            while time.time() < clock[1]:
                time.sleep(0.5)
                done, failed = sum(progress[0::2]), sum(progress[1::2])
                bar.n = min(round(time.time() - start), round(args.duration))
                bar.set_postfix(requests=done, errors=failed, rps=f"{done / max(time.time() - start, 1e-3):.0f}")
            bar.set_description("finishing requests in flight")
            _wait_events(events, "done", args.processes, args.timeout + 60, on_done)
        after = _server_counters(args.server, args.token) or before
        pyqlib = drivers.collect(args.timeout + 60) if args.pyqlib else None
    finally:
        drivers.stop()
        for proc in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return summarize(args, results, before, after, pyqlib)


def summarize(args, results: list[dict], before, after, pyqlib) -> dict:
    rows = Rows.concat(results)
    errors: dict[str, int] = {}
    for part in results:
        for message, count in part["errors"].items():
            errors[message] = errors.get(message, 0) + count
    answers: dict[tuple, list] = {}
    for part in results:
        for rid, digest, kind, body, result, count in part["answers"]:
            entry = answers.setdefault((rid, digest), [kind, body, result, 0])
            entry[3] += count
    elapsed = float((rows.starts + rows.latencies).max()) if len(rows) else args.duration
    server = {name: _delta(after[name], before[name]) for name in SERVER_COUNTERS}
    published = server["tasks_published"]
    wrong, wrong_samples = None, []
    if not args.no_verify:
        from tqdm import tqdm

        items = [answers[key] for key in sorted(answers, key=lambda k: (answers[k][0], k))]
        wrong = 0
        checks = verify_answers(args.data, items, args.verify_processes, args.cache_dir_name)
        for (kind, body, result, count), reason in tqdm(zip(items, checks), total=len(items), desc="verifying",
                                                        unit="answer", file=sys.stderr):
            if reason is not None:
                wrong += count
                wrong_samples.append(f"{kind} {body} -> {str(result)[:80]}: {reason}")
    connect_errors = sum(part["connect_errors"] for part in results)
    failed = int((rows.outcomes != OK).sum())
    return {
        "server": args.server, "clients": args.clients, "duration": args.duration, "elapsed": round(elapsed, 3),
        "processes": args.processes, "overlap": args.overlap, "mix": args.mix_weights, "encoding": args.encoding,
        "requests": len(rows), "answered_ok": len(rows) - failed, "errors": failed + connect_errors,
        "timeouts": int((rows.outcomes == TIMEOUT).sum()), "connect_errors": connect_errors,
        "wrong_answers": wrong, "wrong_distinct": len(wrong_samples),
        "verified_answers": len(answers) if wrong is not None else 0,
        "throughput": throughput(rows, elapsed),
        "tasks_published": sum(published.values()), "tasks_published_by_type": published,
        "dedup_ratio": dedup_ratio(sum(published.values()), len(rows)),
        "server_counters": {name: {"total": sum(v.values()), **v} for name, v in server.items()},
        "latency_ms": latency_table(rows), "lanes": lane_table(rows),
        "server_view": server_view(before.get("latency", {}), after.get("latency", {})),
        "error_samples": sorted(errors.items(), key=lambda kv: -kv[1])[:20],
        "wrong_samples": wrong_samples[:20],
        "pyqlib": {k: v for k, v in pyqlib.items() if k != "latencies_s"} if pyqlib else None,
        "_rows": rows, "_pyqlib_latencies": (pyqlib or {}).get("latencies_s"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ConnectionError, TimeoutError, RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"sim: {exc}", file=sys.stderr)
        return 2
    rows, pyqlib_latencies = summary.pop("_rows"), summary.pop("_pyqlib_latencies")
    if args.json:
        write_json(summary, args.json)
    if args.plot:
        plot(rows, args.plot, f"{args.clients} clients, {args.overlap}, {summary['throughput']} req/s",
             pyqlib_latencies, args.duration)
    print_table(summary)
    return 1 if summary["errors"] or summary["wrong_answers"] or (summary["pyqlib"] or {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
