"""Soak test: start a server, load it steadily for a bounded time, kill a random Python model process every few
minutes, and fail on any lost request, a kill that does not heal, or memory / fd growth past the bound.

    python scripts/soak.py --start build/tiny --minutes 30 --kill-every 180 --json out/soak.json
    python scripts/soak.py --start build/tiny --kill-each --clients 8 --requests 200 --json out/kills.json
    python scripts/soak.py --start build/tiny --short          # ~40 s: what the tests run

--kill-each kills every Python model (preprocess, text_encoder, denoise, unet, vae_decoder, postprocess, ...)
once in turn under the load (8 x 200 by default with --requests 200): the per-model recovery time and the
p99 during each recovery window. Prints a per-minute table, the kills and the memory / fd figures; writes
the full report (serving/soak.py REPORT_KEYS, plus the RSS / fd samples) with --json. Exit 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from toonark.scripts import _cli as cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__doc__, raw=True)
    parser.add_argument("--start", type=Path, required=True, metavar="OUT",
                        help="build folder (OUT/triton_model_repo) or a model repository; the soak starts its server")
    parser.add_argument("--minutes", type=float, default=30.0, help="load time (the run's bound)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, help="requests per client (default: until the time is up)")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between kills")
    parser.add_argument("--kill-each", action="store_true", help="kill each Python model once, in turn")
    parser.add_argument("--model", action="append", help="only kill this model's processes (repeatable)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first kill and the memory baseline")
    parser.add_argument("--max-growth-mb", type=float, default=256.0, help="RSS growth bound after warm-up (MiB)")
    parser.add_argument("--max-fd-growth", type=int, default=64, help="tritonserver open-fd growth bound after warm-up")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="width and height")
    parser.add_argument("--seed", type=int, default=0, help="picks the random kills")
    parser.add_argument("--short", action="store_true",
                        help="a ~40 s run (4 clients, a kill every 5 s after 4 s, 10 s 'minutes') for tests")
    parser.add_argument("--standby", action="store_true",
                        help="also start a second server on the same repository; the clients fail over to it (the "
                             "kills hit the first): zero lost requests even if tritonserver itself aborts")
    parser.add_argument("--log", type=Path, help="tritonserver's log file")
    parser.add_argument("--json", type=Path, help="write the report here (atomically)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace):
    from toonark.serving.soak import SoakConfig
    common = dict(models=tuple(args.model or ()), kill_each=args.kill_each, seed=args.seed, steps=args.steps,
                  width=args.size, height=args.size, max_growth_mb=args.max_growth_mb, max_fd_growth=args.max_fd_growth)
    if args.short:
        return SoakConfig(seconds=40.0, clients=4, requests_per_client=args.requests or 10 ** 9, kill_every_s=5.0,
                          warmup_s=4.0, sample_every_s=2.0, minute_s=10.0, **common)
    return SoakConfig(seconds=args.minutes * 60, clients=args.clients, requests_per_client=args.requests or 10 ** 9,
                      kill_every_s=args.kill_every, warmup_s=args.warmup, **common)


def run(args: argparse.Namespace) -> int:
    from toonark.serving.launcher import TritonServer
    from toonark.serving.loadtest import write_report
    from toonark.serving.soak import format_report, run_soak
    config = config_from(args)
    repo = args.start / "triton_model_repo" if (args.start / "triton_model_repo").is_dir() else args.start
    standby_log = args.log.with_name(args.log.stem + "-standby" + args.log.suffix) if args.log else None
    with TritonServer(repo, log_path=args.log) as server, contextlib.ExitStack() as stack:
        standby = stack.enter_context(TritonServer(repo, log_path=standby_log)) if args.standby else None
        print(f"started tritonserver for {repo}: ready in {server.wait_ready(300):.1f} s", flush=True)
        server.start_watchdog()
        if standby is not None:
            print(f"standby tritonserver: ready in {standby.wait_ready(300):.1f} s", flush=True)
            standby.start_watchdog()
        report = run_soak(server, config, progress=lambda line: print(line, flush=True), standby=standby)
    print(format_report(report))
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
