"""`rlhf-engine`: one entry point, one subcommand per phase.

    rlhf-engine sft  --config sft.yaml  [--key value ...]     supervised fine-tuning on prompt/response JSONL
    rlhf-engine rm   --config rm.yaml   [--key value ...]     reward model on preference pairs
    rlhf-engine dpo  --config dpo.yaml  [--key value ...]     direct preference optimisation
    rlhf-engine ppo  --config ppo.yaml  [--key value ...]     PPO (critic + GAE) against a reward model or function
    rlhf-engine grpo --config grpo.yaml [--key value ...]     GRPO (group advantages, no critic)
    rlhf-engine rloo --config rloo.yaml [--key value ...]     RLOO (leave-one-out baseline, no critic)
    rlhf-engine reinforce++ --config reinforce_pp.yaml        REINFORCE++ (KL-shaped returns, no critic)
    rlhf-engine remax --config remax.yaml                     ReMax (greedy baseline, no critic)
    rlhf-engine demo [--task story|arithmetic] [--out DIR] [--steps N] [--phase ...] [--algo ppo|grpo|rloo|...]
                     [--policy-loss ppo|gspo|cispo|sapo]

A flag overrides the YAML key of the same name (dashes or underscores); `rlhf-engine <phase> --help` lists every
key with its default and meaning; `--resume true` continues from the last complete checkpoint in output_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

PHASES = {
    "sft": ("rlhf_engine.trainers.sft:SFTConfig", "run_sft", "supervised fine-tuning on prompt/response JSONL"),
    "rm": ("rlhf_engine.trainers.reward:RewardConfig", "run_reward", "reward model on preference pairs"),
    "dpo": ("rlhf_engine.trainers.dpo:DPOConfig", "run_dpo", "direct preference optimisation on preference pairs"),
    "ppo": ("rlhf_engine.trainers.ppo:PPOConfig", "run_ppo", "PPO with a critic against a reward model/function"),
    "grpo": ("rlhf_engine.trainers.ppo:PPOConfig", "run_ppo", "GRPO: group-relative advantages, no critic"),
    "rloo": ("rlhf_engine.trainers.ppo:PPOConfig", "run_ppo", "RLOO: leave-one-out baseline, no critic"),
    "reinforce++": ("rlhf_engine.trainers.ppo:PPOConfig", "run_ppo",
                    "REINFORCE++: whitened discounted returns of the KL-shaped reward, no critic"),
    "remax": ("rlhf_engine.trainers.ppo:PPOConfig", "run_ppo", "ReMax: a greedy response's reward as the baseline"),
}
# rlhf_engine.ops.POLICY_LOSSES, spelled out so that `--help` imports no torch (a test keeps the two equal)
POLICY_LOSSES = ("ppo", "gspo", "cispo", "sapo")


def _config_class(phase: str):
    import importlib

    module, _, name = PHASES[phase][0].partition(":")
    return getattr(importlib.import_module(module), name)


def config_help(cls) -> str:
    """Every key of ``cls`` with its default and documentation."""
    lines = ["config keys (YAML, or --key value on the command line):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name:<22} {default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _phase(phase: str, argv: list[str]) -> int:
    from rlhf_engine.config import load_config
    from rlhf_engine.trainers import phases

    cls = _config_class(phase)
    parser = argparse.ArgumentParser(prog=f"rlhf-engine {phase}", description=PHASES[phase][2],
                                     epilog=config_help(cls), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config keys (optional: flags alone work too)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = parser.parse_known_args(argv)
    for i, arg in enumerate(overrides):  # a bare --resume means --resume true
        if arg == "--resume" and (i + 1 == len(overrides) or overrides[i + 1].startswith("--")):
            overrides.insert(i + 1, "true")
    # the RL phases are PPOConfig with their algorithm set before the config is built (its defaults depend on it)
    rl = phase in ("ppo", "grpo", "rloo", "reinforce++", "remax")
    config = load_config(cls, args.config, overrides, defaults={"algorithm": phase} if rl else None)
    if rl and config.algorithm != phase:
        raise ValueError(f"`rlhf-engine {phase}` runs algorithm {phase}, but the config sets algorithm: "
                         f"{config.algorithm}; drop that key or run `rlhf-engine {config.algorithm}`")
    if args.no_progress:
        from rlhf_engine.progress import silence_library_bars

        silence_library_bars()
    try:
        getattr(phases, PHASES[phase][1])(config, progress=not args.no_progress)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_message(phase, config, argv), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    return 0


def interrupted_message(phase: str, config, argv: list[str]) -> str:
    """One line for Ctrl-C: the step reached, the last complete checkpoint, the command that resumes."""
    from rlhf_engine.checkpoint import latest_checkpoint
    from rlhf_engine.metrics import METRICS_FILE, read_metrics

    rows = read_metrics(os.path.join(config.output_dir, METRICS_FILE)) if config.output_dir else []
    reached = f"after step {rows[-1]['step'] + 1}" if rows else "before the first step"
    checkpoint = latest_checkpoint(config.output_dir) if config.output_dir else None
    if checkpoint is None:
        return f"rlhf-engine {phase}: interrupted {reached}; no complete checkpoint yet, so a rerun starts over"
    args = [a for i, a in enumerate(argv) if a != "--resume" and not a.startswith("--resume=")
            and not (i and argv[i - 1] == "--resume" and a.lower() in ("true", "false", "1", "0", "yes", "no"))]
    command = " ".join(["rlhf-engine", phase, *args, "--resume"])
    return (f"rlhf-engine {phase}: interrupted {reached}; last complete checkpoint: {checkpoint}; "
            f"resume with: {command}")


def _demo(args) -> int:
    from rlhf_engine.demo.run import print_summary, run_demo

    if args.no_progress:
        from rlhf_engine.progress import silence_library_bars

        silence_library_bars()
    if args.task == "arithmetic":
        from rlhf_engine.demo.arithmetic import print_arithmetic_summary, run_arithmetic

        if args.phase != "all" or args.steps is not None or args.algo != "ppo":
            raise SystemExit("rlhf-engine demo --task arithmetic runs SFT then GRPO: --phase, --steps and --algo "
                             "belong to the story task; use --sft-steps and --ppo-iterations")
        out = args.out or "runs/arithmetic"
        summary = run_arithmetic(out, sft_steps=args.sft_steps or 800, rl_iterations=args.ppo_iterations or 150,
                                 seed=args.seed, progress=not args.no_progress, policy_loss=args.policy_loss)
        print_arithmetic_summary(summary, out)
        return 0
    args.out = args.out or "runs/demo"
    args.sft_steps, args.ppo_iterations = args.sft_steps or 300, args.ppo_iterations or 40

    steps = {"sft_steps": args.sft_steps, "rm_steps": args.rm_steps, "ppo_iterations": args.ppo_iterations}
    if args.steps is not None:
        if args.phase == "all":
            raise SystemExit("rlhf-engine demo: --steps sets the steps of the phase chosen with --phase sft|rm|ppo; "
                             "with every phase use --sft-steps, --rm-steps and --ppo-iterations")
        steps[{"sft": "sft_steps", "rm": "rm_steps", "ppo": "ppo_iterations"}[args.phase]] = args.steps
    summary = run_demo(args.out, **steps, preference_prompts=args.preference_prompts, seed=args.seed, algo=args.algo,
                       phase=args.phase, progress=not args.no_progress, policy_loss=args.policy_loss)
    print_summary(summary, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for phase, (_, _, help_text) in PHASES.items():
        sub.add_parser(phase, help=help_text, add_help=False)
    demo = sub.add_parser("demo", help="run the pipeline on the embedded task (tiny model, nothing downloaded)")
    demo.add_argument("--task", choices=("story", "arithmetic"), default="story",
                      help="story: RLHF with a learned reward model (default); arithmetic: RLVR, SFT from scratch "
                           "then GRPO against the exact-answer verifier")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, runs/arithmetic)")
    demo.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: 300; arithmetic 800)")
    demo.add_argument("--rm-steps", type=int, default=300, help="reward-model optimizer steps (default: 300)")
    demo.add_argument("--ppo-iterations", type=int, default=None,
                      help="PPO / GRPO iterations (default: 40; arithmetic 150)")
    demo.add_argument("--preference-prompts", type=int, default=2000,
                      help="prompts whose two SFT samples the annotator labels (default: 2000)")
    demo.add_argument("--phase", choices=("all", "sft", "rm", "ppo"), default="all",
                      help="run one phase, reusing the earlier phases' outputs in --out (default: all)")
    demo.add_argument("--steps", type=int, default=None, help="steps (iterations for ppo) of the --phase chosen")
    demo.add_argument("--algo", choices=("ppo", "grpo", "rloo", "reinforce++", "remax"), default="ppo",
                      help="RL algorithm of the last phase: ppo (critic) or the critic-free grpo / rloo / "
                           "reinforce++ / remax")
    demo.add_argument("--policy-loss", choices=POLICY_LOSSES, default="ppo",
                      help="policy loss of the RL phase: ppo (clipped ratio), gspo (sequence ratio), cispo (clipped "
                           "IS weight), sapo (soft gate)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    """Runs one command; returns its exit status. The process group a distributed run created is ended here."""
    from rlhf_engine.distributed import shutdown_distributed

    try:
        return _main(argv)
    finally:
        shutdown_distributed()


def entry() -> None:
    """The console script (`rlhf-engine`, `python -m rlhf_engine.cli`): ``main``, then the exit. A process that ran
    a process group ends through ``distributed.exit_process`` (see there why)."""
    from rlhf_engine import distributed

    status = main()
    if distributed.ran_process_group():
        distributed.exit_process(status)
    sys.exit(status)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PHASES:
        from rlhf_engine.config import ConfigError
        from rlhf_engine.data.jsonl import DataError

        try:
            return _phase(argv[0], argv[1:])
        except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
            if os.environ.get("RLHF_ENGINE_DEBUG"):
                raise
            print(f"rlhf-engine {argv[0]}: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    entry()
