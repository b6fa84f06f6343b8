"""`make bench`: toonark's engines vs diffusers in PyTorch eager and torch.compile, side by side
on one device in one process (see benchmarks/bench.py). `--tiny` runs the tiny pipeline on the CPU
in seconds (structure check for tests/CI); the default is SD-1.5 shapes on CUDA."""
from __future__ import annotations

import sys

from toonark.benchmarks.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
