"""``python -m specdiff_kernels.models.pusht_eval expert|eval``: the scripted expert's or a
policy's closed-loop success rate and mean final coverage on gym-pusht (a module of its own: the
expert imports the environment helpers of :mod:`.pusht`, so they cannot import it back)."""

from __future__ import annotations

import json

import torch

from .pusht import TRAIN_TIMESTEPS, load_policy, require_gym_pusht
from .pusht_expert import generate_demos
from .pusht_loop import ChunkPlanner, PlannerConfig, run_episodes, summarize


def main(argv: list[str] | None = None) -> int:
    """``python -m specdiff_kernels.models.pusht_eval expert|eval``: the expert's or the shipped
    policy's (ancestral DDPM) success rate and mean final coverage."""

    from ..argtypes import OneLineParser, positive_int

    ap = OneLineParser(
        prog="python -m specdiff_kernels.models.pusht_eval", description=main.__doc__
    )
    ap.add_argument("what", choices=["expert", "eval"])
    ap.add_argument("--episodes", type=positive_int, default=None, help="200 expert / 50 eval")
    ap.add_argument("--first-seed", type=int, default=None, help="0 expert / 100000 eval")
    ap.add_argument("--steps", type=positive_int, default=TRAIN_TIMESTEPS, help="DDPM steps")
    ap.add_argument("--weights", default=None, help="a pusht_policy.safetensors (default: shipped)")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="sampler seed")
    args = ap.parse_args(argv)
    try:
        require_gym_pusht()
    except ImportError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    if args.what == "expert":
        n = args.episodes or 200
        _, summary = generate_demos(n, first_seed=args.first_seed or 0)
        print(json.dumps(summary))
        return 0
    em = load_policy(args.weights)
    planner = ChunkPlanner(em, PlannerConfig(steps=args.steps, window=None, seed=args.seed))
    first = 100_000 if args.first_seed is None else args.first_seed
    seeds = list(range(first, first + (args.episodes or 50)))
    episodes, _ = run_episodes(planner, seeds)
    print(json.dumps(summarize(episodes, planner.records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
