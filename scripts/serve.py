"""Serve a generated model repository with the tritonserver bundled in nvidia-pytriton, in the
foreground, until Ctrl-C (`make serve OUT=dir HTTP_PORT= GRPC_PORT= METRICS_PORT=`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toonark import api
from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="model repository (OUT/triton_model_repo)")
    parser.add_argument("--host", default=api.DEFAULT_HOST, help="address for HTTP, gRPC and metrics (0.0.0.0: all)")
    parser.add_argument("--http-port", type=int, default=api.DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=api.DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=api.DEFAULT_METRICS_PORT)
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for all models")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--idle-unload-s", type=float, default=0.0,
                        help="free the engines' sessions after this many seconds without requests; the next "
                             "request loads them again and is served (0: never)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toonark.serving.launcher import ServerOptions, serve_forever
    return serve_forever(ServerOptions(repo=args.repo, host=args.host, http_port=args.http_port,
                                       grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                       log_verbose=args.log_verbose, idle_unload_s=args.idle_unload_s),
                         ready_timeout=args.ready_timeout)


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
