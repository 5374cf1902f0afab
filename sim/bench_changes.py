"""What telling an append from a rewrite costs: the digests a cache's record holds, and classify after each
kind of change, on a generated dataset (files in the page cache, as on a server that reads them daily).

    python -m sim.bench_changes [--instruments 300] [--days 2500] [--repeat 7]

The cache is Alpha158's fields over a market listing every instrument (its 6 raw fields). Prints the median
milliseconds of each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from qlib.contrib.data.loader import Alpha158DL

from qlib_server.datagen import generate_dataset
from qlib_server.datagen_updates import append_days, rewrite_value
from qlib_server.worker.changes import classify, digests
from qlib_server.worker.datacache import cache_sources


def median_ms(step, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=300)
    parser.add_argument("--days", type=int, default=2500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    fields = Alpha158DL.get_feature_config()[0]
    with tempfile.TemporaryDirectory() as work:
        root = generate_dataset(Path(work) / "data", instruments=args.instruments, days=args.days,
                                markets={"csi300": args.instruments})
        market = {"market": "csi300", "filter_pipe": []}
        files = cache_sources(root, market, fields, "day")
        sums = digests(root, files)
        size = sum(s[0] for s in files.values() if s)
        print(f"{len(files)} files, {size / 1e6:.1f} MB; {len(json.dumps(sums)) / 1e3:.0f} kB of digests in JSON")
        stats = median_ms(lambda: cache_sources(root, market, fields, "day"), args.repeat)
        print(f"cache_sources (stats):        {stats:7.1f} ms")
        print(f"digests:                      {median_ms(lambda: digests(root, files), args.repeat):7.1f} ms")
        print(f"classify, nothing changed:    {median_ms(lambda: classify(files, sums, root), args.repeat):7.1f} ms")
        append_days(root, 1)
        print(f"classify, one day appended:   {median_ms(lambda: classify(files, sums, root), args.repeat):7.1f} ms"
              f"  ({classify(files, sums, root).reason})")
        rewrite_value(root, "SZ000299", "vwap", 10, 1.0)  # the last file read
        print(f"classify, then one rewritten: {median_ms(lambda: classify(files, sums, root), args.repeat):7.1f} ms"
              f"  ({classify(files, sums, root).reason})")


if __name__ == "__main__":
    main()
