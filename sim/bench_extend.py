"""The daily update measured: Alpha158 computed in full by the engine, in full with a checkpoint, and extended by
one appended day from that checkpoint; CPU time (every thread) and wall time, and the checkpoint's size.

    python -m sim.bench_extend [--instruments 300] [--days 2500] [--repeat 3]

The data: a generated dataset of ``days + 1`` days, and a copy of its first ``days`` days (every feature file
cut after that day: the data before the append, of which the longer data is a continuation). Prints a table;
checks that the extension equals the full computation over the longer data on the changed rows.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=300)
    parser.add_argument("--days", type=int, default=2500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-extend-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> int:
    import qlib
    from qlib.contrib.data.loader import Alpha158DL
    from qlib.data.data import ExpressionD

    from qlib_server.datagen import generate_dataset
    from qlib_server.engine import features
    from qlib_server.engine.checkpoint import Checkpoint
    from qlib_server.worker import storage

    root = generate_dataset(work / "data", instruments=args.instruments, days=args.days + 1, start="2012-01-04",
                            markets={"csi300": args.instruments})
    qlib.init(provider_uri=str(root), region="cn", logging_level="ERROR",
              feature_provider={"class": "LocalFeatureProvider", "kwargs": {"backend": storage.BACKEND}})
    names = Alpha158DL.get_feature_config()[0]
    codes = sorted(p.name.upper() for p in (root / "features").iterdir())
    before = work / "before"
    for path in (root / "features").glob("*/*.bin"):
        raw = np.fromfile(path, dtype="<f4")
        cut = before / "features" / path.parent.name / path.name
        cut.parent.mkdir(parents=True, exist_ok=True)
        if int(raw[0]) < args.days:
            raw[:1 + args.days - int(raw[0])].tofile(cut)
    readers = {args.days - 1: features.feature_reader(before, "day"), args.days: features.feature_reader(root, "day")}

    def reader(end):
        return readers[end]

    def compute(end, checkpoint):
        def extent_of(expression):
            left, right = expression.get_extended_window_size()
            return max(0, -int(left)), end + int(right)

        return list(features.blocks(codes, names, 0, end, expression_of=ExpressionD.get_expression_instance,
                                    extent_of=extent_of, read=reader(end), by_qlib=None, checkpoint=checkpoint))

    old, new = args.days - 1, args.days
    compute(old, True)  # kernels loaded
    rows = []
    for label, call in [
        ("full, engine", lambda: compute(old, False)),
        ("full, engine + checkpoint", lambda: compute(old, True)),
    ]:
        best = min((_timed(call) for _ in range(args.repeat)), key=lambda r: r[1])
        rows.append((label, best[1], best[2]))
    blocks = compute(old, True)
    saved = Checkpoint(names, 0, old, [b.checkpoint for b in blocks])
    data = saved.to_bytes()

    def extension():
        loaded = Checkpoint.from_bytes(data)
        return list(features.extend_blocks(loaded, new, expression_of=ExpressionD.get_expression_instance,
                                           read=reader(new)))

    best = min((_timed(extension) for _ in range(args.repeat)), key=lambda r: r[1])
    rows.append(("extension by 1 day (checkpoint loaded)", best[1], best[2]))
    extended = best[0]
    want = compute(new, False)
    for got, full in zip(extended, want):
        for c in range(len(names)):
            assert np.array_equal(got.values[c], full.values[c][:, got.start:], equal_nan=True), names[c]
            assert np.array_equal(got.present[c], full.present[c][:, got.start:]), names[c]

    print(f"\n== Alpha158 ({len(names)} fields) over {args.instruments} instruments x {args.days} days "
          f"(+1 appended), best of {args.repeat}")
    print(f"  {'':<42} {'wall s':>8} {'cpu s':>8} {'wall %':>7}")
    for label, wall, cpu in rows:
        print(f"  {label:<42} {wall:>8.3f} {cpu:>8.3f} {100 * wall / rows[0][1]:>6.1f}%")
    print(f"  checkpoint: {saved.nbytes / 1e6:.2f} MB of arrays, {len(data) / 1e6:.2f} MB as .npz, "
          f"{len(saved.blocks)} blocks; extension equal to the full computation on rows {extended[0].start}.."
          f"{new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
