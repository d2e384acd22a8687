"""`rlhf-engine` command line: one entry point, one subcommand per job.

    rlhf-engine demo [--out runs/demo] [--sft-steps 300] [--rm-steps 150] [--ppo-iterations 20]
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from rlhf_engine.demo.run import print_summary, run_demo

    summary = run_demo(args.out, sft_steps=args.sft_steps, rm_steps=args.rm_steps, ppo_iterations=args.ppo_iterations,
                       seed=args.seed, progress=not args.no_progress)
    print_summary(summary, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the embedded task (tiny model, nothing downloaded)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--sft-steps", type=int, default=300, help="SFT optimizer steps (default: 300)")
    demo.add_argument("--rm-steps", type=int, default=150, help="reward-model optimizer steps (default: 150)")
    demo.add_argument("--ppo-iterations", type=int, default=20, help="PPO iterations (default: 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
