"""Runs every benchmark with its defaults: `python -m bench [--only NAMES] [--skip NAMES]`.

Each runs as `python -m bench.NAME` in its own process, in this order: loss, pipeline,
serving (colleagues' modules, run when present), throughput, flops (reads throughput's
step times), quality (the longest). Tables go to bench/results/NAME.md and .json, and
docs/BENCHMARKS.md collects them. A missing module is skipped with a note; a failing one
is reported and the rest still run.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from bench.throughput import ROOT

ORDER = ("loss", "pipeline", "serving", "throughput", "flops", "quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(ORDER))
    parser.add_argument("--skip", default="")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(","))
    failed = []
    for name in [n for n in args.only.split(",") if n and n not in skip]:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"note: bench.{name} is not there (yet); skipped", flush=True)
            continue
        print(f"== bench.{name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT).returncode
        print(f"== bench.{name}: rc={rc}, {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
