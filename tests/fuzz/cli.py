"""The command line of the fuzz tier (see runner.py and replay.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.fuzz.attacker import KINDS
from tests.fuzz.fake_gearmand import RETRY_ATTACK_RATE, RETRY_ATTACKS
from tests.fuzz.procs import REPO
from tests.fuzz.runner import Options, run_campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to fuzz (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="gproxy's log, the peers' logs (default: a new temp dir)")
    parser.add_argument("--save", type=Path, help="where inputs that broke an invariant go (default WORKDIR/findings)")
    parser.add_argument("--max-packet-size", type=int, default=65536)
    parser.add_argument("--src", type=Path, default=REPO, help="directory holding the gproxy package to run")
    parser.add_argument("--attackers", type=int, default=5, help="worker-side connections at once")
    parser.add_argument("--episodes", type=int, default=3, help="scripted route-B episodes at once")
    parser.add_argument("--canary-bound", type=float, default=3.0, help="worst canary latency allowed, seconds")
    parser.add_argument("--kinds", default="", help=f"comma-separated worker-side kinds ({', '.join(KINDS)})")
    parser.add_argument("--no-pyworker-b", action="store_true", help="no real worker on route B")
    parser.add_argument("--gearmand-threads", type=int, default=0,
                        help="gearmand's --threads (default 0; -1: gearmand's own default, see runner.Options)")
    parser.add_argument("--retry-attacks", default="",
                        help=f"comma-separated attacks on gproxy's retry connection ({', '.join(RETRY_ATTACKS)})")
    parser.add_argument("--retry-attack-rate", type=float, default=RETRY_ATTACK_RATE,
                        help=f"share of retry connections the fake attacks (default {RETRY_ATTACK_RATE})")
    parser.add_argument("--replay", nargs="+", type=Path, metavar="FILE", help="replay saved inputs instead")
    args = parser.parse_args(argv)
    if args.replay:
        from tests.fuzz.replay import replay_files

        return 0 if replay_files(args.replay, src=args.src) else 1
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}")
    retry_attacks = tuple(k for k in args.retry_attacks.split(",") if k)
    if unknown := [k for k in retry_attacks if k not in RETRY_ATTACKS]:
        parser.error(f"unknown retry attacks {unknown}")
    options = Options(
        seconds=args.seconds, seed=args.seed, workdir=args.workdir, save_dir=args.save,
        max_packet_size=args.max_packet_size, src=args.src, attackers=args.attackers,
        episodes=args.episodes, canary_bound=args.canary_bound, kinds=kinds,
        pyworker_b=not args.no_pyworker_b, retry_attacks=retry_attacks, retry_attack_rate=args.retry_attack_rate,
        gearmand_threads=None if args.gearmand_threads < 0 else args.gearmand_threads,
    )  # fmt: skip
    report = run_campaign(options)
    print(report.text(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
