"""A profiled step's kernels, from the Chrome trace that `scripts/bench.py --profile` keeps when
FINETUNE_BENCH_TRACE names a file: the GPU's busy time, the kernel count, and the kernels that took
the most time, per profiled step; with --gaps N, the N longest stretches with no kernel running.

    FINETUNE_BENCH_TRACE=/tmp/trace.json python scripts/bench.py ... --profile
    python scripts/trace_summary.py /tmp/trace.json [--top 30] [--gaps 20]    # a .json.gz is read as well
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import busy_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=30, help="how many kernels to list (default 30)")
    parser.add_argument("--gaps", type=int, default=0, help="list this many of the longest idle stretches")
    args = parser.parse_args()
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    print(busy_line(events))
    steps = sum(1 for e in events if e.get("name", "").startswith("ProfilerStep#") and e.get("cat") == "user_annotation")
    calls, micros = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "kernel" and e.get("ph") == "X":
            calls[e["name"]] += 1
            micros[e["name"]] += e["dur"]
    print(f"per step (over {steps}): {sum(micros.values()) / steps / 1e3:,.2f} ms of kernels in "
          f"{sum(calls.values()) / steps:,.0f} launches")
    print(f"{'ms/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for name, total in micros.most_common(args.top):
        print(f"{total / steps / 1e3:9.2f} {calls[name] / steps:10.0f} {total / calls[name]:8.1f}  {name[:110]}")
    if args.gaps:
        print_gaps(events, args.gaps)


def print_gaps(events: list[dict], count: int) -> None:
    """The longest stretches in which no kernel ran on any stream, with the kernels on either side and
    the host-side ops that were running when each began (what the GPU was waiting for)."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "kernel" and e.get("ph") == "X")
    host_ops = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime") and e.get("ph") == "X"]
    gaps, busy_until, before = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, busy_until, before, name))
        if end > busy_until:
            busy_until, before = end, name
    print(f"idle: {sum(g[0] for g in gaps) / 1e3:,.2f} ms in {len(gaps):,} stretches between the first and last "
          f"kernel, {sum(g[0] for g in gaps if g[0] >= 20) / 1e3:,.2f} ms of it in stretches of 20 us or more")
    for length, at, before, after in sorted(gaps, reverse=True)[:count]:
        running = sorted({name for s, e, name in host_ops if s <= at < e}, key=len)[:4]
        print(f"{length:9.1f} us  after {before[:50]}  before {after[:50]}  host: {'; '.join(r[:40] for r in running)}")


if __name__ == "__main__":
    main()
