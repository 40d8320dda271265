"""python -m tests.chaos --seconds N --seed S: one chaos run; exit 0 if every check passed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.chaos.run import Options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the chaos phase (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every decision (default 1)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of load before the first fault")
    parser.add_argument("--hang-bound", type=float, default=45.0, help="seconds a foreground job may take")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep logs and records here")
    parser.add_argument("--keep", action="store_true", help="keep the run dir even if every check passed")
    args = parser.parse_args(argv)
    options = Options(args.seconds, args.seed, warmup=args.warmup, hang_bound=args.hang_bound,
                      run_dir=args.run_dir, keep=args.keep)
    return 0 if run(options) else 1


if __name__ == "__main__":
    sys.exit(main())
