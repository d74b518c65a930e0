"""`python -m bench`: run the benchmarks and print a table (Markdown, so it can be pasted).

Options: --quick (tiny sizes: the smoke test's), --only NAME[,NAME] (post, get, lag, overhead,
restart, connections, eventlag, streams, listing, stalled, a1111,
cluster: needs redis-server and the cluster extra), --load-generator auto|wrk|python,
--json PATH (every figure, machine-readable), --workdir DIR (kept afterwards; default: a
temporary folder, removed).
Exit status 1 if a measure could not be taken; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import (
    a1111,
    cluster,
    connections,
    get_throughput,
    lag,
    listing,
    overhead,
    post_latency,
    resident,
    restart,
    stalled,
    streams,
)
from .common import FULL, QUICK, Result, Sizes, machine_description, make_certificate

Measure = Callable[[Path, tuple[Path, Path], Sizes, argparse.Namespace], list[Result]]

MEASURES: dict[str, Measure] = {
    "post": lambda w, c, s, _o: post_latency.measure(w, c, s),
    "get": lambda w, c, s, o: get_throughput.measure(w, c, s, o.load_generator),
    "lag": lambda w, c, s, _o: lag.measure(w, c, s),
    "overhead": lambda w, c, s, _o: overhead.measure(w, c, s),
    "restart": lambda w, c, s, _o: restart.measure(w, c, s),
    "connections": lambda w, c, s, _o: connections.measure(w, c, s),
    "resident": lambda w, c, s, _o: resident.measure(w, c, s),
    "eventlag": lambda w, c, s, _o: streams.measure_lag(w, c, s),
    "streams": lambda w, c, s, o: streams.measure_fanout(w, c, s, o.load_generator),
    "listing": lambda w, c, s, _o: listing.measure(w, c, s),
    "stalled": lambda w, c, s, _o: stalled.measure(w, c, s),
    "a1111": lambda w, c, s, _o: a1111.measure(w, c, s),
    "cluster": lambda w, c, s, _o: cluster.measure(w, c, s),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument(
        "--only", default=",".join(MEASURES), help=f"comma-separated subset of {list(MEASURES)}"
    )
    parser.add_argument(
        "--load-generator",
        choices=get_throughput.GENERATORS,
        default="auto",
        help="status-GET load: wrk, or the pure-Python generator (auto: wrk if installed)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--workdir", type=Path, help="work folder, kept (default: temporary)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {unknown}; choose from {list(MEASURES)}")
    return args


def table(results: list[Result]) -> str:
    lines = ["| measure | result | target | met |", "|---|---|---|---|"]
    for result in results:
        met = {True: "yes", False: "**no**", None: ""}[result.met]
        lines.append(f"| {result.measure.strip()} | {result.figure} | {result.target} | {met} |")
    lines.append("")
    lines += [f"- {r.measure.strip()}: {r.note}" for r in results if r.note]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    machine = machine_description()
    print(
        "# sd-rest benchmark" + (" (quick: tiny sizes, figures meaningless)" if args.quick else "")
    )
    print()
    print("\n".join(f"- {key}: {value}" for key, value in machine.items()))
    print(flush=True)
    keep = args.workdir is not None
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sd-rest-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    failed = False
    began = time.monotonic()
    try:
        cert = make_certificate(root)
        for name in args.only:
            workdir = root / name
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                results += MEASURES[name](workdir, cert, sizes, args)
                print(f"  {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
            except Exception as exc:
                failed = True
                traceback.print_exc()
                results.append(Result(name, f"error: {exc}".splitlines()[0][:200]))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    print(f"\n({time.monotonic() - began:.0f} s)")
    if args.json is not None:
        doc = {
            "machine": machine,
            "quick": args.quick,
            "results": [result.to_json() for result in results],
        }
        args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(parse_args(sys.argv[1:])))
