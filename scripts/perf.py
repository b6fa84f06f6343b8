"""`make perf OUT=dir [URL=host:port]`: Triton's perf_analyzer against the `toonark` ensemble: concurrency sweep
(1..4), p50/p90/p95/p99 latency and throughput, against a running server (--url) or one started from
OUT/triton_model_repo; a table and OUT/perf.json (toonark/serving/perf.py has the how and why)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="build folder; its triton_model_repo is served "
                        "when no --url is given, and perf.json is written there")
    parser.add_argument("--url", help="HOST:PORT of a running server (HTTP, or gRPC with --protocol grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--perf-venv", type=Path, default=Path(".venv-perf"))
    parser.add_argument("--concurrency", default="1,2,3,4", help="comma-separated levels")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20, help="requests per measurement window (at least 3x "
                        "the concurrency)")
    parser.add_argument("--stability", type=int, default=30, help="perf_analyzer --stability-percentage: 3 "
                        "windows in a row within this band (p95 latency and throughput)")
    parser.add_argument("--json", type=Path, help="default OUT/perf.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from toonark.serving.perf import measure, table
    levels = tuple(int(v) for v in args.concurrency.split(",") if v.strip())
    result = measure(args.out, url=args.url, protocol=args.protocol, perf_venv=args.perf_venv, concurrency=levels,
                     size=args.size, steps=args.steps, requests=args.requests, stability=args.stability,
                     json_path=args.json)
    print(table(result))
    print(f"wrote {result['json']}")


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
