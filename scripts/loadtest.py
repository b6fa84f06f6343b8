"""Load-test a toonark server: N clients x M requests, HTTP and gRPC alternating per client, bounded in
count and time; prints throughput, p50/p95/p99 latency and errors grouped by message, and writes JSON.

    python scripts/loadtest.py --http-url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001 --clients 8 --requests 200
    python scripts/loadtest.py --start build/tiny --clients 8 --requests 200 --json out/loadtest.json

    python scripts/loadtest.py --http-url 127.0.0.1:8000 --http-url 127.0.0.1:9000 --grpc-url ... (several servers)

--start OUT starts a server on free loopback ports from OUT/triton_model_repo (or a repository folder)
for the run and stops it afterwards. Several --http-url / --grpc-url: clients spread over the servers and a
retried request goes to the next one (failover). Requests are retried as serving/client.py's RetryPolicy
says (UNAVAILABLE, connection errors, a dead model process; bounded); --no-retry counts every failure.
Exit code 0 when every request succeeded, 1 otherwise."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark import api
from toonark.scripts import _cli as cli
from toonark.serving.client import PROTOCOLS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    target = parser.add_argument_group("server")
    target.add_argument("--http-url", action="append", help="HOST:PORT of a running server's HTTP endpoint "
                        "(repeatable: several servers)")
    target.add_argument("--grpc-url", action="append", help="HOST:PORT of a running server's gRPC endpoint "
                        "(repeatable)")
    target.add_argument("--start", type=Path, metavar="OUT",
                        help="start a server for the run: a build folder (OUT/triton_model_repo) or a repository")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--protocol", action="append", choices=PROTOCOLS,
                        help="repeatable; default: both (client i uses the (i mod n)-th)")
    parser.add_argument("--prompt", default="a happy otter with a kite")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--format", choices=api.IMAGE_FORMATS, default=api.DEFAULT_FORMAT)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--no-retry", action="store_true", help="count every failure at once (no client retry)")
    parser.add_argument("--json", type=Path, help="write the report here (atomically)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toonark.serving.client import DEFAULT_RETRY
    from toonark.serving.loadtest import LoadConfig, format_table, run_load, write_report
    protocols = tuple(args.protocol or PROTOCOLS)
    server = None
    try:
        if args.start:
            from toonark.serving.launcher import TritonServer
            repo = args.start / "triton_model_repo" if (args.start / "triton_model_repo").is_dir() else args.start
            server = TritonServer(repo)
            server.start()
            print(f"started tritonserver for {repo}: ready in {server.wait_ready(300):.1f} s", flush=True)
            server.start_watchdog()
            args.http_url, args.grpc_url = args.http_url or server.http_url, args.grpc_url or server.grpc_url
        elif not (args.http_url or args.grpc_url):
            raise ValueError("give --http-url and/or --grpc-url of a running server, or --start OUT")
        elif args.protocol is None:   # default: the protocols whose URL was given; an explicit list stays as is
            protocols = tuple(p for p in protocols if (args.http_url if p == "http" else args.grpc_url))
        config = LoadConfig(http_url=args.http_url, grpc_url=args.grpc_url, clients=args.clients,
                            requests_per_client=args.requests, max_seconds=args.max_seconds, protocols=protocols,
                            prompt=args.prompt, steps=args.steps, width=args.width, height=args.height,
                            format=args.format, request_timeout_s=args.timeout,
                            retry=None if args.no_retry else DEFAULT_RETRY)
        report = run_load(config)
    finally:
        if server is not None:
            server.stop()
    print(format_table(report))
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    return 0 if report["errors"] == 0 and report["ok"] > 0 else 1


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
