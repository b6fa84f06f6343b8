"""`make perf OUT=dir [URL=host:port]`: perf_analyzer concurrency sweep (1..4) of the `toonark` ensemble,
p50/p95/p99 and throughput, against a running server (--url) or one started from OUT/triton_model_repo.
See toonark/serving/perf.py."""
from __future__ import annotations

import sys

from toonark.serving.perf import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
