"""Serve a generated model repository with the tritonserver bundled in nvidia-pytriton, in the
foreground, until Ctrl-C (`make serve OUT=dir HTTP_PORT= GRPC_PORT= METRICS_PORT=`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="model repository (OUT/triton_model_repo)")
    parser.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics (0.0.0.0: all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for all models")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from toonark.serving.client import one_line
    from toonark.serving.launcher import ServerOptions, serve_forever
    try:
        return serve_forever(ServerOptions(repo=args.repo, host=args.host, http_port=args.http_port,
                                           grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                           log_verbose=args.log_verbose), ready_timeout=args.ready_timeout)
    except (ValueError, RuntimeError, FileNotFoundError, TimeoutError) as err:
        print(f"error: {one_line(str(err).split(chr(10))[0])}", file=sys.stderr)
        tail = str(err).split("\n")[1:]
        if tail:
            print("\n".join(tail), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
