"""A profiled step's kernels, from the Chrome trace that `scripts/bench.py --profile` keeps when
FINETUNE_BENCH_TRACE names a file: the GPU's busy time, the kernel count, and the kernels that took
the most time, per profiled step.

    FINETUNE_BENCH_TRACE=/tmp/trace.json python scripts/bench.py ... --profile
    python scripts/trace_summary.py /tmp/trace.json [--top 30]      # a .json.gz is read as well
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


if __name__ == "__main__":
    main()
